"""Many runs in one program: sweeps and federated averaging, on top of `jaxdl.training`.

    spaces         --param KEY=SPACE -> trial values (grid, random draws)
    group          one vmapped group: M members of a config as one jitted program
    sweep          `jaxdl sweep`: trials -> groups -> DIR/trials/NNN, sweep.json, table.txt
    optuna_search  Optuna's samplers and pruners driving vmapped groups (ask-and-tell)
    federated      FedAvg over simulated clients (`federated` config section)

Imports point down: this package uses `jaxdl.training` (build, the fit loop's pieces, the
workdir contract and its lock) and `jaxdl.core.vmapped`; nothing below imports it.
"""
