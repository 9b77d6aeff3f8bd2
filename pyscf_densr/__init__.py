"""pyscf-densr: a super-resolution electron-density initial guess for PySCF.

>>> import pyscf_densr                 # registers the 'densr' key
>>> mf = dft.RKS(mol, xc='pbe')
>>> mf.init_guess = 'densr'
>>> mf.kernel()

or, with explicit options, ``dm0 = pyscf_densr.init_guess(mf, model=..., device=...)`` and
``mf.kernel(dm0)``. Importing this package stays light: torch is loaded on first use.
"""

__version__ = '0.1.0'

from pyscf_densr.hook import init_guess, load_model, DensrError, register  # noqa: F401

register()
