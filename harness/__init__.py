"""nq-snn-harness: NQ / QCFS training, ANN->SNN conversion, sweeps and reports."""
from .neurons import NQ, QCFS, IFNeuron
from .models import create_model, list_models
from .convert import to_snn, SpikingNet, ConversionError

__all__ = ["NQ", "QCFS", "IFNeuron", "create_model", "list_models", "to_snn", "SpikingNet",
           "ConversionError"]
__version__ = "0.1.0"
