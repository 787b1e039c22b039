import sys

from stylegrad.apps.cli import main

sys.exit(main())
