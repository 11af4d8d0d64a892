"""Tools that measure the framework (benchmarks, top-k reports); they import the package, nothing imports them."""
