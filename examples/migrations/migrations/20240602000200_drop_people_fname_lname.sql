-- phase: contract
-- Step 3, after every host serves app v2: catch up the rows app v1 inserted
-- while the rollout was under way (only those: name IS NULL), then make name
-- required and drop the old columns. No code that reads them runs any more.
-- up
UPDATE people SET name = fname || ' ' || lname WHERE name IS NULL;
ALTER TABLE people ALTER COLUMN name SET NOT NULL;
ALTER TABLE people DROP COLUMN fname;
ALTER TABLE people DROP COLUMN lname;
