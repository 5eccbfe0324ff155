"""Protocol side of Yujing: register codecs, request planning and transports. No scheduling, spool or MQTT."""
