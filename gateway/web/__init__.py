"""The gateway's local status page (gateway.web.server) and its users file (gateway.web.users)."""
