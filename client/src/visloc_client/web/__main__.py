"""``python -m visloc_client.web ...`` = ``visloc web ...``."""

import sys

from visloc_client.cli import main

if __name__ == "__main__":
    sys.exit(main(["web", *sys.argv[1:]]))
