import sys

from pmaprt.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
