"""Copy the public-domain photograph of Grace Hopper from matplotlib's sample data into data/ (done once; the copy
is committed, so nothing reads matplotlib's package at run time). It is the image the README's
`python analyze.py --image=data/grace_hopper.jpg` example draws.

    python data/make_sample_image.py
"""
import os
import shutil

import matplotlib

src = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
dst = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grace_hopper.jpg")
shutil.copyfile(src, dst)
print(f"copied {src} -> {dst} ({os.path.getsize(dst)} bytes)")
