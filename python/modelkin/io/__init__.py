"""The io layer: model references and their resolution (paths, shards, the Hugging Face cache),
safetensors reading and writing, dtypes, models held in memory, and the machinery every layer shares
(the error hierarchy, progress bars, how a command reports failure and is interrupted, the
temporary directories outputs are written in).

May import: nothing of modelkin but the compiled core (``modelkin._core``). Every other layer may
import it."""
