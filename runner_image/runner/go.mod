module airlock.dev/runner

go 1.19
