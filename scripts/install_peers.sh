#!/usr/bin/env bash
# The data loaders bench/data_pipeline.py and bench/imagenet_scale.py measure against (MosaicML Streaming, litdata),
# installed into .peers/ beside .venv, not in it: Streaming imports transformers, which needs a huggingface_hub
# older than timm's, and pins an older numpy. The benches put .peers/ first on the PYTHONPATH of a child process;
# what .venv already has (torch, timm, numpy, boto3, obstore) is not installed again (--no-deps, pinned list).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install -q --target .peers --no-deps --upgrade \
  mosaicml-streaming==0.13.0 litdata==0.2.76 \
  transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2 regex==2026.12.2 \
  lightning-utilities==0.15.3 xxhash==3.8.2 zstd==1.5.7.2 python-snappy==0.7.3 brotli==1.2.1 cramjam==2.14.0 \
  catalogue==2.0.10 tifffile==2026.3.3 pytz==2026.6 crc32c==2.8 \
  azure-core==1.41.0 azure-identity==1.27.0 azure-storage-blob==12.31.1 azure-storage-file-datalake==12.26.1 \
  isodate==0.7.2 msal==1.39.0 msal-extensions==1.3.1 PyJWT==2.15.1 \
  google-cloud-core==2.8.0 google-cloud-storage==3.2.0 google-crc32c==1.9.0 google-resumable-media==2.11.0 \
  oci==2.189.0 circuitbreaker==2.1.3 pyOpenSSL==26.4.0 paramiko==3.5.1 bcrypt==5.0.0 PyNaCl==1.6.2 \
  python-pkcs11==0.9.4 asn1crypto==1.5.1
PYTHONPATH=.peers .venv/bin/python -c "import streaming, litdata; print('peers:', 'streaming', streaming.__version__, 'litdata', litdata.__version__)"
