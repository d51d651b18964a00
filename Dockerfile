FROM python:3.11-slim
WORKDIR /opt/gorgon
# A C compiler builds the native CPU kernels (models/kernels) on first use; without one the engine runs
# its slower pure-torch attention path.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
# The CPU build of torch by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
# (or another CUDA index) for GPUs.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} "torch>=2.5"
COPY pyproject.toml README.md ./
COPY decoding decoding
COPY models models
COPY wire wire
COPY server server
COPY training training
RUN pip install --no-cache-dir .
EXPOSE 8000
ENTRYPOINT ["gorgon"]
CMD ["serve", "--host", "0.0.0.0"]
