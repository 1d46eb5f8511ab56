import sys

from .cli import main

if __name__ == "__main__":  # not when something imports this module (e.g. multiprocessing's spawn)
    sys.exit(main())
