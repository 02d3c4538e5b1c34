"""The lab's pytest plugins (fixtures/) for tests and scenarios."""

pytest_plugins = ["fixtures.hygiene", "fixtures.shard", "fixtures.artifacts", "fixtures.report", "fixtures.image", "fixtures.machine", "fixtures.backend", "fixtures.scsi", "fixtures.guest_driver", "fixtures.migration"]
