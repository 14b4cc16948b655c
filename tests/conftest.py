import torch
import pytest

torch.set_num_threads(2)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
