# The worker image: CUDA build of PyTorch, the package, `zimage-stream worker`.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# The CUDA wheels of torch (the CPU-only default would not see the GPU), the version the
# tests run (Makefile): engine/compilation.py reads its recompile error by its message.
RUN pip install --index-url https://download.pytorch.org/whl/cu128 "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[worker]" \
    # rapidocr pulls the GUI OpenCV (libGL); the headless build must own cv2
    && pip install --force-reinstall --no-deps opencv-python-headless

# SIGTERM stops fetching, finishes the running batch, commits and leaves the group.
STOPSIGNAL SIGTERM
CMD ["zimage-stream", "worker"]
