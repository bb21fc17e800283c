"""Pure ONNX graph walking (the lowest floor above errors/fileio/paths): node index, state pairs, layout ops
(`graph`) and the structural patterns the precision rules name (`patterns`). Imports onnx only, no quant layer
above it: precision, the calibration readers and the artifact builds all use it."""
