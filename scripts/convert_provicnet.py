"""Convert a released ProViCNet checkpoint into a converted-weights artifact.

    python scripts/convert_provicnet.py --checkpoint T2_best.pth --output weights/provicnet_t2
    python scripts/convert_provicnet.py --checkpoint TRUS_best.pth --output weights/provicnet_trus [--drop-cl-head]
    python scripts/convert_provicnet.py --checkpoint mpMRI_Fusion_best.pth --output weights/provicnet_fusion \
        --t2 T2_best.pth --adc ADC_best.pth --dwi DWI_best.pth

The kind (MRI slice model, TRUS slice model, mpMRI fusion) is inferred from the keys; sizes from the shapes. The
fusion needs the three sequence checkpoints (or their converted artifact directories) because upstream inference
overwrites each fusion stream's first conv + BatchNorm with that sequence model's head (see
transfer_jax/convert/provicnet.py). Every problem is reported at once; the exit status is 1 on failure.
"""
import sys

from transfer_jax.convert.provicnet import main

if __name__ == "__main__":
    sys.exit(main())
