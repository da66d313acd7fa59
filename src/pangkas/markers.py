"""Names of the attributes pangkas sets on a model it changed or loaded.

``io`` writes and reads them; the pruning verbs set them, so they live below both.
"""

# Set on a model whose tensors pangkas cut (channel or layer pruning): its file may load into a
# fresh, larger instance of the same class, which is cut to the file's shapes first.
RESHAPED = "_pangkas_reshaped"
EDITS = "_pangkas_edits"  # structural edits (removed blocks) that a fresh instance must replay
LOADED_FROM = "_pangkas_loaded_from"  # the file a model was loaded from: saving back may replace it
