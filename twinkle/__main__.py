import sys

from twinkle.cli import main

sys.exit(main())
