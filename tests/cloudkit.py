"""What the cloud tests share: the skip when a cloud's extra is not installed."""

from __future__ import annotations

import pytest

from broker.extras import missing

_LACKING = "; ".join(filter(None, (missing("bedrock"), missing("vertex"), missing("azure", "entra"))))
needs_clouds = pytest.mark.skipif(bool(_LACKING), reason=f"the cloud extras are not installed ({_LACKING})")
