#!/bin/bash
# Build gpu/pyscf_trim.tar.xz (about 10 MB): the installed PySCF without what grid-cache
# building does not touch, for a GPU machine that has torch but no PySCF and
# no package registry, where a small upload matters. Dropped: post-HF and PBC
# Python packages, their C libraries, large basis files other than def2-* and ano, and
# libxc.so (18 MB compressed): libxc_itrf.so is replaced by stubs (xcstub.c) so that
# pyscf.dft imports, since grids need numint's AO evaluation but no functional. Nothing that
# evaluates an XC functional works with this bundle; the cache it builds is bitwise the same
# as the full PySCF's (checked on molecules 400-401).
set -eu
SP=$(python -c "import os, pyscf; print(os.path.dirname(os.path.dirname(pyscf.__file__)))")
HERE=$(cd "$(dirname "$0")" && pwd)
T=$(mktemp -d)
cp -r "$SP/pyscf" "$T/"
cd "$T/pyscf"
find . -name __pycache__ -prune -exec rm -rf {} +
rm -rf pbc cc adc gw mcscf fci mcpdft agf2 ci tdscf grad hessian prop sgx solvent qmmm \
    geomopt mp semiempirical lo eph extras
(cd lib && rm -f libfci.so libccsdt.so libcc.so libagf2.so libmp.so libsolvent.so libpdft.so \
    libmcscf.so libxcfun_itrf.so deps/lib/libxc.so deps/lib64/libxcfun*)
(cd gto/basis && find . -type f -size +100k ! -name 'def2-*' ! -name '__init__.py' \
    ! -name 'minao*' ! -name 'ano.dat' -delete)
gcc -shared -fPIC -O1 -o lib/libxc_itrf.so "$HERE/xcstub.c"
mkdir -p "$HERE/../../gpu"
tar -cf - -C "$T" pyscf | xz -T2 -3 > "$HERE/../../gpu/pyscf_trim.tar.xz"
rm -rf "$T"
ls -la "$HERE/../../gpu/pyscf_trim.tar.xz"
