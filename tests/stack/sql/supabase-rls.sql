-- Row level security on the seed's tables, as a Supabase project has it
-- (the dashboard enables it on every table it makes); no policy, so anon
-- and authenticated read and write nothing, while service_role bypasses it.
ALTER TABLE usage_requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE portal_usage_monthly ENABLE ROW LEVEL SECURITY;
