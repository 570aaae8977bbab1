"""drnn: train deep recurrent character language models from the command line."""

import warnings

# drnn uses no NumPy, and PyTorch does not require it: without it, importing torch warns on stderr
# that NumPy could not be initialised, two lines before every command's output. Set before torch loads.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__version__ = "0.1.0"
