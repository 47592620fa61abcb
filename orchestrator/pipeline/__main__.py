import sys

from orchestrator.pipeline.command import main

sys.exit(main())
