#!/usr/bin/env bash
# Prepare what a GPU check carries to the device machine (see benchmarks/gpu_all.sh):
#   .device/wheels  clip-anytorch and its one missing dependency (the GPU image has torch, timm, OpenCV)
#   .device/voc     the first N train images of the shared VOC subset, in VOC layout
# Both are ignored by git; name `.device` in the device call's carry list.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-48}"
VOC="${VPL_VOC_ROOT:-../shared/data/voc2012_subset/VOC2012}"
mkdir -p .device/wheels .device/voc/VOC2012/{JPEGImages,SegmentationClass,Annotations,ImageSets/Segmentation}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/wheels clip-anytorch ftfy wcwidth
[ -d "$VOC" ] || { echo "VOC subset not found at $VOC (set VPL_VOC_ROOT)" >&2; exit 2; }
head -n "$N" "$VOC/ImageSets/Segmentation/train.txt" > .device/voc/VOC2012/ImageSets/Segmentation/train.txt
while read -r id; do
    cp "$VOC/JPEGImages/$id.jpg" .device/voc/VOC2012/JPEGImages/
    cp "$VOC/SegmentationClass/$id.png" .device/voc/VOC2012/SegmentationClass/
    [ -f "$VOC/Annotations/$id.xml" ] && cp "$VOC/Annotations/$id.xml" .device/voc/VOC2012/Annotations/ || true
done < .device/voc/VOC2012/ImageSets/Segmentation/train.txt
du -sh .device
