# Yujing node firmware entry point (MicroPython runs main.py after boot.py).
# The firmware package lives in /lib/yujing_node; /config.json and /secrets.json come from provisioning.
from yujing_node import app

app.main()
