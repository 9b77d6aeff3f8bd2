"""The ``densr`` console command: one subcommand per face of the package.

    densr predict   molecule -> density cube files and a guess (see pyscf_densr.predict)
    densr data      generate labels with PySCF (pyscf_densr.data)
    densr train     train a model from a config (pyscf_densr.train)
    densr finetune  fine-tune a shipped model (pyscf_densr.train, with `init`)
    densr bench     SCF cycles and wall time against PySCF's guesses (pyscf_densr.bench)
    densr compat    PySCF's own SCF/DFT tests with densr as the default guess (pyscf_densr.compat)
"""

import importlib
import sys

COMMANDS = {
    'predict': 'pyscf_densr.predict',
    'data': 'pyscf_densr.data',
    'train': 'pyscf_densr.train',
    'finetune': 'pyscf_densr.train',
    'bench': 'pyscf_densr.bench',
    'compat': 'pyscf_densr.compat',
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help') or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ('-h', '--help') else 2
    cmd = argv.pop(0)
    mod = importlib.import_module(COMMANDS[cmd])
    fn = getattr(mod, 'main_' + cmd, None) or mod.main
    return fn(argv) or 0


if __name__ == '__main__':
    sys.exit(main())
