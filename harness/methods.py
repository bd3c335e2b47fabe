"""Method names shared by training (Config.method) and the report; imports nothing."""
from __future__ import annotations

# noise.mode -> the method's name in tables, MLflow tags and result.json
METHOD_BY_MODE = {"qcfs": "QCFS", "layerwise": "NQ", "fixed": "NQ-fixed"}
METHOD_ORDER = ["QCFS", "NQ", "NQ-fixed"]
# the paired comparison every table reports: DELTA_METHOD - BASE_METHOD
DELTA_METHOD, BASE_METHOD = "NQ", "QCFS"
