"""The job system: config, state on disk, master, workers, tracker."""
