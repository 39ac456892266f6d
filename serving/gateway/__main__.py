"""``python -m loraplane.serving.gateway``: the OpenAI-compatible endpoint in front of the vLLM servers."""

import sys

from loraplane.serving.gateway.app import main

sys.exit(main())
