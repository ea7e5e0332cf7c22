-- phase: expand
-- The schema app v1 was written against (the seed's `people` table).
-- up
CREATE TABLE people (
    id SERIAL PRIMARY KEY,
    fname VARCHAR(20) NOT NULL,
    lname VARCHAR(20) NOT NULL
);
-- down
DROP TABLE people;
