-- phase: expand
-- Step 1 of the split: a new nullable column for app v2, and the old columns
-- no longer NOT NULL (v2 inserts rows with a name only). App v1 keeps working:
-- it never sees the new column and still finds fname/lname on its own rows.
-- up
ALTER TABLE people ADD COLUMN name VARCHAR(41) NULL;
ALTER TABLE people ALTER COLUMN fname DROP NOT NULL;
ALTER TABLE people ALTER COLUMN lname DROP NOT NULL;
-- down
-- Back to the v1 schema (rollback --migrations): rows v2 created get their
-- old columns back from name, then the constraints v1 relies on return.
UPDATE people SET fname = split_part(name, ' ', 1), lname = substr(name, length(split_part(name, ' ', 1)) + 2)
    WHERE fname IS NULL OR lname IS NULL;
ALTER TABLE people ALTER COLUMN fname SET NOT NULL;
ALTER TABLE people ALTER COLUMN lname SET NOT NULL;
ALTER TABLE people DROP COLUMN name;
