"""A model's size from its config alone, without torch: ``drnn presets`` lists every preset's parameter
count, and building each model to count it imported torch (2 s) for a table of a dozen numbers.

Tested equal to ``models.count_parameters`` of the built model for every preset and every option that
changes the count (tests/test_models.py), so the formula cannot drift from the model.
"""

from __future__ import annotations

from drnn_cli.config import ModelConfig

# Gate blocks of H rows in each cell's weights (the layouts in cells.py)
GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def parameter_count(vocab_size: int, config: ModelConfig) -> int:
    """The trainable parameters of ``build_model(vocab_size, config)``, a shared tensor counted once.

    Each layer has ``G·H`` rows of input weights (the one-hot or embedding width, then ``H``), of
    recurrent weights (``H``) and of biases: two per row in PyTorch's cell form, one in d2l's, whose
    ``bias_hh`` is held at zero and untrained. Then the embedding (``V·E``) and the decoder (``H·V``
    weights, ``V`` biases), whose weight is the embedding's when tied. Nothing else changes the count:
    ``impl`` (same names and shapes), dropouts, ``weight_drop``, ``init``, ``nonlinearity``.
    """
    hidden, rows = config.hidden_size, GATES[config.cell] * config.hidden_size
    biases = 1 if config.cell_form == "d2l" else 2
    widths = [config.embedding_dim or vocab_size] + [hidden] * (config.num_layers - 1)
    recurrent = sum(rows * (width + hidden + biases) for width in widths)
    embedding = vocab_size * config.embedding_dim
    decoder = (0 if config.tie_weights else hidden * vocab_size) + vocab_size
    return recurrent + embedding + decoder
