"""StealGuard's lab and lifecycle: datasets, victims, surrogates, attacks, evaluation, sweeps, registry, packaging."""
