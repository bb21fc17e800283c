"""Pure ONNX graph walking (the lowest floor above errors/fileio/paths): node index, state pairs, layout ops
(`graph`), the structural patterns the precision rules name (`patterns`), blocks (`blocks`) and best-effort shape
inference (`shapes`). Imports onnx only (and lazily ONNX Runtime's pure-Python symbolic shape inference), no quant
layer above it: precision, the calibration readers and the artifact builds all use it."""
