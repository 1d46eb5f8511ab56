import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned child (deploy.make_apart) imports the main module
    sys.exit(main())
