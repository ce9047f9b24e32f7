#!/usr/bin/env bash
# Builds wheels/ at the repository root: the packages the GPU machine lacks, as wheels for its Python 3.12 on
# x86-64, without their dependencies (the machine has torch 2.11, timm, peft, numpy, scipy, pandas, matplotlib,
# tensorboard, scikit-image and scikit-learn). SimpleITK, itk and mlflow stay out: the suite runs without tracking
# and reads NIfTI through nibabel. Carry the folder with the device call (`carry: ["wheels"]`, about 5 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf wheels
mkdir -p wheels
pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels \
    monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 fire==0.7.1 termcolor==3.3.0 \
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0 attrs==26.1.0
ls -l wheels
du -sh wheels
