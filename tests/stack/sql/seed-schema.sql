-- The schema exactly as the Node.js script's README gives it
-- (shared/reference/seed-usage-aggregation.md). usage-agg must work on it as is.
CREATE TABLE usage_requests (
  id SERIAL PRIMARY KEY,
  portal_id BIGINT NOT NULL,
  request_timestamp TIMESTAMP DEFAULT NOW(),
  source_date VARCHAR(255),
  source_format VARCHAR(50),
  target_format VARCHAR(50),
  success BOOLEAN NOT NULL,
  error_message TEXT,
  month_year VARCHAR(7) NOT NULL -- '2025-01'
);

CREATE TABLE portal_usage_monthly (
  id SERIAL PRIMARY KEY,
  portal_id BIGINT NOT NULL,
  month_year VARCHAR(7) NOT NULL, -- '2025-01'
  request_count INTEGER DEFAULT 0,
  success_count INTEGER DEFAULT 0,
  error_count INTEGER DEFAULT 0,
  last_request_at TIMESTAMP,
  created_at TIMESTAMP DEFAULT NOW(),
  updated_at TIMESTAMP DEFAULT NOW(),
  UNIQUE(portal_id, month_year)
);
