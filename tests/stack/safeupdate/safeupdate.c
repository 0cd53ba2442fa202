/*
 * The test stack's stand-in for pg-safeupdate, which Supabase loads into
 * every PostgREST session (`ALTER ROLE authenticator SET
 * session_preload_libraries = 'safeupdate'`) and Debian does not package.
 * Written here, not copied: the same rule, checked after parse analysis of
 * every statement, so inside PL/pgSQL functions (SPI parses each statement)
 * and in data-modifying CTEs too: an UPDATE or DELETE without a WHERE clause
 * is refused with SQLSTATE 21000 and PostgREST answers 400, as on Supabase.
 */
#include "postgres.h"

#include "fmgr.h"
#include "nodes/parsenodes.h"
#include "parser/analyze.h"
#include "utils/queryjumble.h"

PG_MODULE_MAGIC;

void _PG_init(void);

static post_parse_analyze_hook_type prev_post_parse_analyze_hook = NULL;

static void
check_query(Query *query)
{
	ListCell   *lc;

	if (query == NULL)
		return;
	if ((query->commandType == CMD_DELETE || query->commandType == CMD_UPDATE)
		&& (query->jointree == NULL || query->jointree->quals == NULL))
		ereport(ERROR,
				(errcode(ERRCODE_CARDINALITY_VIOLATION),
				 errmsg("%s requires a WHERE clause",
						query->commandType == CMD_DELETE ? "DELETE" : "UPDATE")));
	foreach(lc, query->cteList)
	{
		CommonTableExpr *cte = lfirst_node(CommonTableExpr, lc);

		if (IsA(cte->ctequery, Query))
			check_query((Query *) cte->ctequery);
	}
}

static void
safeupdate_post_parse_analyze(ParseState *pstate, Query *query, JumbleState *jstate)
{
	if (prev_post_parse_analyze_hook)
		prev_post_parse_analyze_hook(pstate, query, jstate);
	check_query(query);
}

void
_PG_init(void)
{
	prev_post_parse_analyze_hook = post_parse_analyze_hook;
	post_parse_analyze_hook = safeupdate_post_parse_analyze;
}
