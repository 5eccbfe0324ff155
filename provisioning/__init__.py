"""`yujing provision`: what a field technician runs to give a site its identities.

One site directory (0700) holds everything: the site CA, one folder per MQTT identity (key, certificate,
password), and the inventory of what was installed where. `provisioning.cli` is the command line;
`provisioning.workflow` the steps; `identity`, `broker_files` and `inventory` one job each.
"""


class ProvisionError(Exception):
    """A problem the technician can fix; the message says what to do."""
