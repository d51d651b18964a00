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
COPY client client
COPY cluster cluster
# The cluster extra (Ray, pinned) by default, so that the image is also a Ray node for
# `gorgon serve --replicas N --address HEAD:6379`: every node of a Ray cluster needs the same Ray and
# Python versions, and Gorgon itself, which a replica runs. Build with --build-arg EXTRAS= to leave Ray out.
ARG EXTRAS=cluster
RUN pip install --no-cache-dir ".[${EXTRAS}]"
EXPOSE 8000
# Serving:          docker run -p 8000:8000 IMAGE
# A Ray head:       docker run --network host --entrypoint ray IMAGE start --head --port 6379 --block
# A Ray worker:     docker run --network host --entrypoint ray IMAGE start --address HEAD:6379 --block
# Then, anywhere with the image or the cluster extra:
#                   gorgon serve --replicas 4 --threads 4 --address HEAD:6379 --host 0.0.0.0
ENTRYPOINT ["gorgon"]
CMD ["serve", "--host", "0.0.0.0"]
