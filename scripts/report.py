"""`python scripts/report.py DIR`: the same as `python -m housing_reg.report DIR`."""

import sys

from housing_reg.report import main

if __name__ == "__main__":
    sys.exit(main())
