"""``python -m daunce_core.localapi --config server_config.json [--port-file FILE]``: serve in the
foreground (the key from the environment variable DAUNCE_LOCAL_API_KEY)."""
from .server import main

main()
