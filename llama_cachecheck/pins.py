"""The one place that says which llama.cpp we test against.

llama-cpp-python 0.3.36 vendors ggml-org/llama.cpp at this commit (its CHANGELOG says so);
the in-process engine and a `llama-server` built from the same sdist run the same code.
"""

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"
