"""The model step and block matmul in C++ (`decode.cpp` with its `decode_*.h`, `qmatmul.h` with its kernels in
`qkernels.h`), compiled on first use (`build.py`), with the CPU path they take (`isa.py`) and the decoder stack
that runs a model's layers in them (`decoder.py`)."""
