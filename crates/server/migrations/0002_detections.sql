-- What the enclave's defenses recorded, as the client reported it with its latest top-up
-- request that reported any (spec/provisioning.md §6.1): the `detections` object, stored as
-- the server re-serialised it after checking it, and when it arrived.
ALTER TABLE licences ADD COLUMN detections TEXT;
ALTER TABLE licences ADD COLUMN detections_at INTEGER;
