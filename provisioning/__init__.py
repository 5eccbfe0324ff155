"""`yujing provision`: what a field technician runs to give a site its identities.

One site directory (0700) holds everything: the site CA, one folder per MQTT identity (key, certificate,
password), and the inventory of what was installed where. `provisioning.cli` is the command line;
`provisioning.workflow` the steps; `identity`, `broker_files`, `inventory` and `node_files` (what a TLS node's
flash gets) one job each; `runner` installs a plan's boards in parallel over `board` (mpremote), `discover` finds
them, `verify` waits for them online; `simboard` is the board without hardware for the tests.
"""


class ProvisionError(Exception):
    """A problem the technician can fix; the message says what to do."""
