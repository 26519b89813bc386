// End-to-end check of the MLflow UI after a smoke sweep, in a real headless Chromium.
//
// Usage:
//   node mlflow_ui.mjs --base-url http://127.0.0.1:5000 --experiment-id 1 \
//     --parent-run-id <id> --screenshot-dir <dir> [--expect-children 6] [--expect-diverged 2] \
//     [--compare-url <the sweep's printed compare link>] [--curves-url <its curves link>]
// Every option can also come from the environment: MLFLOW_UI_BASE_URL, MLFLOW_UI_EXPERIMENT_ID,
// MLFLOW_UI_PARENT_RUN_ID, ICEAGGR_SCREENSHOT_DIR, MLFLOW_UI_EXPECT_CHILDREN,
// MLFLOW_UI_EXPECT_DIVERGED; CHROMIUM_PATH overrides /usr/bin/chromium.
//
// What it checks, each against what the browser actually renders:
//   0. (with --compare-url / --curves-url) the links the sweep printed, opened first in the fresh
//      profile: the compare page lists exactly the search's trials by name, with a rendered
//      parallel-coordinates chart whose axes include lr, dropout, val_angle and val_resultant;
//      the curves page charts val_angle and val_resultant, one curve per search trial;
//   1. the runs page lists the parent and its child runs (expanded), with parameter columns lr,
//      dropout, normalize and a tag column diverged whose cells match the tracking server, and
//      the diverged runs carry MLflow's failed-status icon (red) while finished runs carry the
//      green one; a status search in the UI lists exactly the diverged runs;
//   2. selecting a diverged and finished runs and pressing Compare opens the compare view, and
//      the loss metric opens a rendered plotly line chart with one curve per selected run, the
//      diverged curve cut short where training stopped;
//   3. the parent run's artifacts tab previews loss_curves.png, stability_table.png and
//      search_landscape.png as
//      decoded images of the logged size;
// and saves a full-page screenshot of every view to the screenshot directory.
// Exits 1 with the reason (and a failure-*.png screenshot) on the first failed check.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';

let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch (err) {
  console.error(
    'playwright-core is not installed in tests/browser: run scripts/install_browser_deps.sh ' +
      `(or "npm ci" in tests/browser). ${err.message}`,
  );
  process.exit(2);
}

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');

const { values: opt } = parseArgs({
  options: {
    'base-url': { type: 'string', default: process.env.MLFLOW_UI_BASE_URL },
    'experiment-id': { type: 'string', default: process.env.MLFLOW_UI_EXPERIMENT_ID },
    'parent-run-id': { type: 'string', default: process.env.MLFLOW_UI_PARENT_RUN_ID },
    'screenshot-dir': {
      type: 'string',
      default: process.env.ICEAGGR_SCREENSHOT_DIR || path.join(REPO, 'runs', 'ui-screenshots'),
    },
    'expect-children': { type: 'string', default: process.env.MLFLOW_UI_EXPECT_CHILDREN || '6' },
    'expect-diverged': { type: 'string', default: process.env.MLFLOW_UI_EXPECT_DIVERGED || '2' },
    'compare-url': { type: 'string', default: process.env.MLFLOW_UI_COMPARE_URL },
    'curves-url': { type: 'string', default: process.env.MLFLOW_UI_CURVES_URL },
  },
});
for (const key of ['base-url', 'experiment-id', 'parent-run-id']) {
  if (!opt[key]) {
    console.error(`missing --${key}`);
    process.exit(2);
  }
}
const BASE = opt['base-url'].replace(/\/+$/, '');
const EXP = opt['experiment-id'];
const PARENT = opt['parent-run-id'];
const SHOTS = path.resolve(opt['screenshot-dir']);
const EXPECT_CHILDREN = Number(opt['expect-children']);
const EXPECT_DIVERGED = Number(opt['expect-diverged']);
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const PARENT_IMAGES = ['loss_curves.png', 'stability_table.png', 'search_landscape.png'];
const UI_TIMEOUT = 60_000; // the UI is a large bundle; a busy 2-core CI box needs the slack

fs.mkdirSync(SHOTS, { recursive: true });

class CheckError extends Error {}
function check(cond, message) {
  if (!cond) throw new CheckError(message);
}
function log(...args) {
  console.log('[mlflow-ui]', ...args);
}

// ------------------------------------------------------------------ ground truth (REST API)

async function api(method, endpoint, body) {
  const res = await fetch(`${BASE}/api/2.0/mlflow/${endpoint}`, {
    method,
    headers: body ? { 'Content-Type': 'application/json' } : undefined,
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!res.ok) throw new Error(`${method} ${endpoint}: HTTP ${res.status} ${await res.text()}`);
  return res.json();
}

const asMap = (items) => Object.fromEntries((items || []).map((x) => [x.key, x.value]));

async function loadTruth() {
  const { runs = [] } = await api('POST', 'runs/search', {
    experiment_ids: [EXP],
    filter: `tags.mlflow.parentRunId = '${PARENT}'`,
    max_results: 1000,
  });
  const children = runs.map((r) => ({
    id: r.info.run_id,
    name: r.info.run_name,
    status: r.info.status,
    params: asMap(r.data.params),
    tags: asMap(r.data.tags),
  }));
  for (const c of children) {
    const hist = await api(
      'GET',
      `metrics/get-history?run_id=${c.id}&metric_key=loss&max_results=10000`,
    );
    c.lossPoints = (hist.metrics || []).length;
  }
  const parent = (await api('GET', `runs/get?run_id=${PARENT}`)).run;
  const artifacts = (await api('GET', `artifacts/list?run_id=${PARENT}`)).files || [];
  return { children, parent, artifacts: artifacts.map((f) => f.path) };
}

// ------------------------------------------------------------------ browser helpers

/** A full-page screenshot: MLflow scrolls inside its own panes, so grow the viewport first. */
async function fullShot(page, name) {
  const file = path.join(SHOTS, name);
  const before = page.viewportSize();
  const extra = await page.evaluate(() => {
    let most = 0;
    for (const el of document.querySelectorAll('*')) {
      const style = getComputedStyle(el);
      if (!/(auto|scroll)/.test(style.overflowY)) continue;
      most = Math.max(most, el.scrollHeight - el.clientHeight);
    }
    return most;
  });
  if (extra > 0) {
    const height = Math.min(before.height + extra, 6000);
    await page.setViewportSize({ width: before.width, height });
    await page.waitForTimeout(800);
  }
  await page.screenshot({ path: file, fullPage: true });
  if (extra > 0) await page.setViewportSize(before);
  log('screenshot', file);
  return file;
}

/** Closes the MLflow Assistant side panel (if shown) so the page gets the full width. */
async function closeAssistant(page) {
  const close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (await close.count()) {
    await close.first().click();
    await page.waitForTimeout(300);
  }
}

const leftRow = (page, runId) => page.locator(`.ag-pinned-left-cols-container [row-id="${runId}"]`);
const centerCell = (page, runId, colId) =>
  page.locator(`.ag-center-cols-container [row-id="${runId}"] [col-id="${colId}"]`);

/** Ticks one column in the "Columns" dropdown, by section (Attributes/Metrics/Parameters/Tags). */
async function setColumn(page, section, name, on) {
  const search = page.getByPlaceholder('Search columns');
  await search.fill(name);
  await page.waitForTimeout(300);
  const nodes = page.locator('.du-bois-light-tree-treenode');
  const info = await nodes.evaluateAll((els) =>
    els.map((e) => ({
      title: (e.querySelector('.du-bois-light-tree-title')?.textContent || '').trim(),
      top: e.querySelectorAll('.du-bois-light-tree-indent-unit').length === 0,
      checked: e.querySelector('.du-bois-light-tree-checkbox-checked') !== null,
    })),
  );
  let current = null;
  for (let i = 0; i < info.length; i++) {
    const m = info[i].title.match(/^(Attributes|Metrics|Parameters|Tags)\b/);
    if (m && info[i].top) {
      current = m[1];
      continue;
    }
    if (current === section && info[i].title === name) {
      if (info[i].checked !== on) {
        await nodes.nth(i).locator('.du-bois-light-tree-checkbox').click();
      }
      return;
    }
  }
  throw new CheckError(
    `the Columns dropdown offers no ${section} column "${name}" (saw: ${info
      .map((x) => x.title)
      .join(', ')})`,
  );
}

/** Expands the parent run's row (idempotent) until `rows` rows are listed. */
async function expandParent(page, rows) {
  const row = leftRow(page, PARENT);
  await row.waitFor({ timeout: UI_TIMEOUT });
  const listed = () => page.locator('.ag-pinned-left-cols-container [row-id]').count();
  if ((await listed()) < rows) {
    await row.locator('[col-id="attributes.`Run Name`"] button').first().click();
  }
  await page
    .waitForFunction(
      (n) => document.querySelectorAll('.ag-pinned-left-cols-container [row-id]').length >= n,
      rows,
      { timeout: UI_TIMEOUT },
    )
    .catch(() => {});
}

/** Auto-sizes the Run Name column (double click on its resize handle) to show whole names. */
async function widenRunNames(page) {
  const handle = page.locator(
    '.ag-header-cell[col-id="attributes.`Run Name`"] .ag-header-cell-resize',
  );
  if (await handle.count()) await handle.first().dblclick();
}

async function statusIconColor(page, runId) {
  const icon = leftRow(page, runId).locator('[col-id="runDateAndNestInfo"] .anticon').first();
  const color = await icon.evaluate((el) => getComputedStyle(el).color);
  const [r, g, b] = color.match(/\d+/g).map(Number);
  return { color, red: r > 150 && r > 2 * g && r > 2 * b, green: g > r && g > b };
}

// ------------------------------------------------------------------ the views

async function checkRunsList(page, truth) {
  const url = `${BASE}/#/experiments/${EXP}/runs`;
  log('open', url);
  await page.goto(url, { waitUntil: 'load' });
  await leftRow(page, PARENT).waitFor({ timeout: UI_TIMEOUT });
  await closeAssistant(page);

  const total = truth.children.length + 1;
  await page.getByText(`${total} matching runs`).waitFor({ timeout: UI_TIMEOUT });

  // Parameter and tag columns, chosen the way a user does: through the Columns dropdown.
  await page.getByTestId('column-selection-dropdown').first().click();
  for (const attr of ['Dataset', 'Source', 'Models']) {
    await setColumn(page, 'Attributes', attr, false);
  }
  for (const p of ['lr', 'dropout', 'normalize']) await setColumn(page, 'Parameters', p, true);
  await setColumn(page, 'Tags', 'diverged', true);
  await page.keyboard.press('Escape');
  await page
    .getByPlaceholder('Search columns')
    .waitFor({ state: 'hidden', timeout: 10_000 })
    .catch(() => {});

  await expandParent(page, total);
  await widenRunNames(page);
  const rowIds = await page
    .locator('.ag-pinned-left-cols-container [row-id]')
    .evaluateAll((rs) => rs.map((r) => r.getAttribute('row-id')));
  check(
    rowIds.length === total,
    `runs table shows ${rowIds.length} rows after expanding the parent, expected ${total}`,
  );
  check(rowIds[0] === PARENT, `first row is ${rowIds[0]}, expected the parent run ${PARENT}`);
  const want = new Set(truth.children.map((c) => c.id));
  const shown = new Set(rowIds.slice(1));
  check(
    want.size === shown.size && [...want].every((id) => shown.has(id)),
    `child rows ${[...shown]} differ from the parent's child runs ${[...want]}`,
  );

  // Headers: Run Name, Created (MLflow's status column), Parameters lr/dropout/normalize, Tags.
  const headers = await page.locator('.ag-header-cell').evaluateAll((els) =>
    Object.fromEntries(els.map((e) => [e.getAttribute('col-id'), e.textContent.trim()])),
  );
  const groups = await page
    .locator('.ag-header-group-cell')
    .evaluateAll((els) => els.map((e) => e.textContent.trim()).filter(Boolean));
  log('headers', JSON.stringify(headers), 'groups', JSON.stringify(groups));
  const expectHeaders = {
    'attributes.`Run Name`': 'Run Name',
    runDateAndNestInfo: 'Created',
    'params.`lr`': 'lr',
    'params.`dropout`': 'dropout',
    'params.`normalize`': 'normalize',
    'tags.`diverged`': 'diverged',
  };
  for (const [colId, text] of Object.entries(expectHeaders)) {
    check(headers[colId] === text, `column ${colId} header is ${headers[colId]}, expected ${text}`);
  }
  check(groups.includes('Parameters') && groups.includes('Tags'), `header groups: ${groups}`);

  // Every child row: name, parameter cells and diverged tag as logged; status icon colour.
  const diverged = truth.children.filter((c) => c.tags.diverged === 'true');
  check(
    diverged.length === EXPECT_DIVERGED,
    `tracking server has ${diverged.length} diverged child runs, expected ${EXPECT_DIVERGED}`,
  );
  for (const c of truth.children) {
    const link = leftRow(page, c.id).locator('[col-id="attributes.`Run Name`"] a[href*="/runs/"]');
    const name = (await link.first().textContent()).trim();
    check(name === c.name, `row ${c.id} shows run name "${name}", expected "${c.name}"`);
    for (const p of ['lr', 'dropout', 'normalize']) {
      const text = (await centerCell(page, c.id, `params.\`${p}\``).textContent()).trim();
      check(text === c.params[p], `${c.name}: ${p} cell shows "${text}", logged "${c.params[p]}"`);
    }
    const tag = (await centerCell(page, c.id, 'tags.`diverged`').textContent()).trim();
    const isDiverged = c.tags.diverged === 'true';
    check(
      isDiverged ? tag === 'true' : tag !== 'true',
      `${c.name}: diverged cell shows "${tag}" (tag ${c.tags.diverged})`,
    );
    const icon = await statusIconColor(page, c.id);
    if (c.status === 'FAILED') {
      check(icon.red, `${c.name} is FAILED but its status icon is ${icon.color}, not red`);
    } else {
      check(c.status === 'FINISHED', `${c.name} has status ${c.status}`);
      check(icon.green, `${c.name} is FINISHED but its status icon is ${icon.color}, not green`);
    }
    if (isDiverged) check(c.status === 'FAILED', `${c.name} diverged but is ${c.status}`);
  }
  const shots = [await fullShot(page, '01-runs-list.png')];

  // A status search typed into the UI lists exactly the diverged runs (plus their parent).
  await page.getByTestId('search-box').fill("attributes.status = 'FAILED'");
  await page.getByTestId('search-box').press('Enter');
  const failed = truth.children.filter((c) => c.status === 'FAILED');
  await page.getByText(`${failed.length + 1} matching runs`).waitFor({ timeout: UI_TIMEOUT });
  await expandParent(page, failed.length + 1);
  const failedRows = await page
    .locator('.ag-pinned-left-cols-container [row-id]')
    .evaluateAll((rs) => rs.map((r) => r.getAttribute('row-id')));
  const failedIds = failed.map((c) => c.id).sort();
  check(
    JSON.stringify(failedRows.slice(1).sort()) === JSON.stringify(failedIds),
    `status search lists ${failedRows.slice(1)}, expected the FAILED runs ${failedIds}`,
  );
  shots.push(await fullShot(page, '02-runs-list-failed.png'));
  log('runs list: ok');
  return shots;
}

async function checkCompare(page, truth) {
  const diverged = truth.children.filter((c) => c.tags.diverged === 'true');
  const finished = truth.children.filter((c) => c.status === 'FINISHED');
  check(diverged.length >= 1 && finished.length >= 2, 'need diverged and finished runs to compare');
  const table = finished.filter((c) => c.tags.sweep_part === 'table');
  const search = finished.filter((c) => c.tags.sweep_part !== 'table');
  const picked = [diverged[0], table[0] || finished[0], search[0] || finished[1]];

  const url = `${BASE}/#/experiments/${EXP}/runs`;
  await page.goto(url, { waitUntil: 'load' });
  await leftRow(page, PARENT).waitFor({ timeout: UI_TIMEOUT });
  await closeAssistant(page);
  // The UI restores the last search; clear it so all runs are listed again.
  const box = page.getByTestId('search-box');
  if ((await box.inputValue()) !== '') {
    await box.fill('');
    await box.press('Enter');
  }
  await page
    .getByText(`${truth.children.length + 1} matching runs`)
    .waitFor({ timeout: UI_TIMEOUT });
  await expandParent(page, truth.children.length + 1);
  for (const c of picked) {
    await leftRow(page, c.id).locator('input.ag-checkbox-input').check();
  }
  const compare = page.getByRole('button', { name: 'Compare', exact: true });
  await compare.waitFor({ timeout: UI_TIMEOUT });
  await compare.click();
  await page.waitForURL(/#\/compare-runs\?/, { timeout: UI_TIMEOUT });
  const heading = page.getByText(`Comparing ${picked.length} Runs from 1 Experiment`).first();
  await heading.waitFor({ timeout: UI_TIMEOUT });
  for (const c of picked) {
    await page.getByText(c.name, { exact: true }).first().waitFor({ timeout: UI_TIMEOUT });
  }
  // The visualizations pane (parallel coordinates) is a plotly chart too.
  const pcp = page.locator('.js-plotly-plot').first();
  await pcp.waitFor({ timeout: UI_TIMEOUT });
  const pcpBox = await pcp.boundingBox();
  check(
    pcpBox && pcpBox.width > 100 && pcpBox.height > 100,
    `compare chart box ${JSON.stringify(pcpBox)}`,
  );
  const shots = [await fullShot(page, '03-compare-runs.png')];

  // The loss metric, from the compare view's metric table, opens the line chart.
  await page.locator('a[title="Plot chart"]', { hasText: /^loss$/ }).first().click();
  await page.waitForURL(/#\/metric\?/, { timeout: UI_TIMEOUT });
  const chart = page.locator('.js-plotly-plot').first();
  await chart.waitFor({ timeout: UI_TIMEOUT });
  await page.waitForFunction(
    (n) => {
      const p = document.querySelector('.js-plotly-plot');
      const names = new Set((p?.data || []).map((d) => d.name));
      return names.size >= n && p.querySelectorAll('.scatterlayer .trace path.js-line').length >= n;
    },
    picked.length,
    { timeout: UI_TIMEOUT },
  );
  const plot = await chart.evaluate((p) => {
    const box = p.getBoundingClientRect();
    const traces = {};
    for (const d of p.data || []) {
      const pts = (d.y || []).filter((y) => Number.isFinite(Number(y))).length;
      traces[d.name] = Math.max(traces[d.name] || 0, pts);
    }
    const lines = [...p.querySelectorAll('.scatterlayer .trace path.js-line')].map((l) => {
      const b = l.getBBox();
      return { d: (l.getAttribute('d') || '').length, w: b.width, h: b.height };
    });
    return { w: box.width, h: box.height, traces, lines };
  });
  log('loss chart', JSON.stringify(plot));
  check(plot.w > 200 && plot.h > 150, `loss chart is ${plot.w}x${plot.h}`);
  check(
    plot.lines.filter((l) => l.d > 0 && (l.w > 0 || l.h > 0)).length >= picked.length,
    `loss chart draws ${plot.lines.length} line paths, expected one per run: ` +
      JSON.stringify(plot.lines),
  );
  for (const c of picked) {
    check(
      c.name in plot.traces,
      `loss chart has no curve for ${c.name}: ${Object.keys(plot.traces)}`,
    );
    check(
      plot.traces[c.name] === c.lossPoints,
      `${c.name}: loss curve has ${plot.traces[c.name]} points, the run logged ${c.lossPoints}`,
    );
    // MLflow draws its own legend next to the chart: "<run name> (loss)".
    const legend = page.getByText(`${c.name} (loss)`, { exact: true });
    check((await legend.count()) >= 1, `the chart legend lacks "${c.name} (loss)"`);
    check(await legend.first().isVisible(), `legend entry "${c.name} (loss)" is hidden`);
  }
  const div = picked[0];
  const healthy = picked[1];
  check(
    plot.traces[div.name] < plot.traces[healthy.name],
    `diverged ${div.name} curve (${plot.traces[div.name]} points) is not cut short of ` +
      `${healthy.name} (${plot.traces[healthy.name]})`,
  );
  await page.getByText(div.name).first().waitFor();
  shots.push(await fullShot(page, '04-compare-loss-chart.png'));
  log('compare + loss chart: ok');
  return shots;
}

/** The plotly chart's axis titles and trace names, once it has drawn. */
async function plotlySummary(page) {
  const chart = page.locator('.js-plotly-plot').first();
  await chart.waitFor({ timeout: UI_TIMEOUT });
  await page.waitForTimeout(1500);
  return chart.evaluate((p) => ({
    names: (p.data || []).map((d) => d.name || ''),
    dims: (p.data || []).flatMap((d) => (d.dimensions || []).map((x) => x.label)),
    text: p.textContent || '',
    box: p.getBoundingClientRect().toJSON(),
  }));
}

async function checkPrintedLinks(page, truth) {
  const search = truth.children.filter((c) => c.tags.sweep_part === 'search');
  check(search.length >= 1, 'the sweep has no search trials to compare');
  const shots = [];
  if (opt['compare-url']) {
    log('open printed compare link', opt['compare-url']);
    await page.goto(opt['compare-url'], { waitUntil: 'load' });
    await page
      .getByText(`Comparing ${search.length} Runs from 1 Experiment`)
      .first()
      .waitFor({ timeout: UI_TIMEOUT });
    await closeAssistant(page);
    for (const c of search) {
      await page.getByText(c.name, { exact: true }).first().waitFor({ timeout: UI_TIMEOUT });
    }
    const pcp = await plotlySummary(page);
    log('printed compare link: parallel coordinates', JSON.stringify(pcp.dims));
    check(pcp.box.width > 100 && pcp.box.height > 100, `compare chart box ${JSON.stringify(pcp.box)}`);
    for (const axis of ['lr', 'dropout', 'val_angle', 'val_resultant']) {
      check(
        pcp.dims.includes(axis) || pcp.text.includes(axis),
        `the printed compare link's parallel-coordinates chart has no ${axis} axis (axes: ` +
          `${pcp.dims.join(', ')})`,
      );
    }
    shots.push(await fullShot(page, '08-printed-compare-link.png'));
  }
  if (opt['curves-url']) {
    log('open printed curves link', opt['curves-url']);
    await page.goto(opt['curves-url'], { waitUntil: 'load' });
    await closeAssistant(page);
    const want = search.flatMap((c) => [`${c.name} (val_angle)`, `${c.name} (val_resultant)`]);
    for (const label of want) {
      await page.getByText(label, { exact: true }).first().waitFor({ timeout: UI_TIMEOUT });
    }
    const chart = await plotlySummary(page);
    log('printed curves link: traces', JSON.stringify(chart.names));
    check(
      chart.names.length >= want.length,
      `the printed curves link draws ${chart.names.length} curves, expected ${want.length}`,
    );
    shots.push(await fullShot(page, '09-printed-curves-link.png'));
  }
  log('printed links: ok');
  return shots;
}

function pngSize(buf) {
  check(buf.length > 24 && buf.toString('latin1', 1, 4) === 'PNG', 'artifact is not a PNG');
  return { width: buf.readUInt32BE(16), height: buf.readUInt32BE(20) };
}

async function checkParentArtifacts(page, truth) {
  const missing = PARENT_IMAGES.filter((f) => !truth.artifacts.includes(f));
  check(
    missing.length === 0,
    `the parent run ${PARENT} has no ${missing.join(', ')} artifact(s) (it has: ` +
      `${truth.artifacts.join(', ')}); the sweep is expected to log them`,
  );
  const url = `${BASE}/#/experiments/${EXP}/runs/${PARENT}/artifacts`;
  log('open', url);
  await page.goto(url, { waitUntil: 'load' });
  const shots = [];
  for (const [i, file] of PARENT_IMAGES.entries()) {
    const q = `path=${encodeURIComponent(file)}&run_uuid=${PARENT}`;
    const res = await fetch(`${BASE}/get-artifact?${q}`);
    check(res.ok, `downloading ${file}: HTTP ${res.status}`);
    const logged = pngSize(Buffer.from(await res.arrayBuffer()));

    const node = page.locator(`[data-testid="artifact-tree-node"][artifact-name="${file}"]`);
    await node.waitFor({ timeout: UI_TIMEOUT });
    await closeAssistant(page);
    await node.click();
    await page.getByText(file, { exact: true }).nth(1).waitFor({ timeout: UI_TIMEOUT });
    const img = page.locator('.mlflow-artifact-view img[src^="blob:"]').first();
    await img.waitFor({ timeout: UI_TIMEOUT });
    await page.waitForFunction(
      (w) => {
        const el = [...document.querySelectorAll('.mlflow-artifact-view img[src^="blob:"]')].find(
          (x) => x.getBoundingClientRect().width > 0,
        );
        return el && el.complete && el.naturalWidth === w;
      },
      logged.width,
      { timeout: UI_TIMEOUT },
    ).catch(() => {});
    const shown = await page.evaluate(() =>
      [...document.querySelectorAll('.mlflow-artifact-view img[src^="blob:"]')]
        .map((x) => {
          const b = x.getBoundingClientRect();
          return { nw: x.naturalWidth, nh: x.naturalHeight, w: b.width, h: b.height };
        })
        .filter((x) => x.w > 0),
    );
    log(file, 'logged', JSON.stringify(logged), 'shown', JSON.stringify(shown));
    check(
      shown.length === 1,
      `${file}: expected one visible preview image, found ${JSON.stringify(shown)}`,
    );
    const [im] = shown;
    check(im.nw > 0 && im.nh > 0, `${file}: preview image did not decode (naturalWidth 0)`);
    check(
      im.nw === logged.width && im.nh === logged.height,
      `${file}: preview is ${im.nw}x${im.nh}, the logged PNG is ${logged.width}x${logged.height}`,
    );
    check(im.w > 50 && im.h > 50, `${file}: preview is drawn at ${im.w}x${im.h}`);
    const stem = file.replace(/\.png$/, '').replace(/_/g, '-');
    const shot = `${String(5 + i).padStart(2, '0')}-parent-artifact-${stem}.png`;
    shots.push(await fullShot(page, shot));
  }
  log('parent artifacts: ok');
  return shots;
}

// ------------------------------------------------------------------ main

const truth = await loadTruth();
log(
  `parent ${truth.parent.info.run_name} (${PARENT}): ${truth.children.length} child runs,`,
  `artifacts: ${truth.artifacts.join(', ')}`,
);
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'mlflow-ui-chromium-'));
let context;
let exitCode = 0;
let page;
try {
  check(fs.existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: run scripts/install_browser_deps.sh`);
  check(
    truth.children.length === EXPECT_CHILDREN,
    `tracking server has ${truth.children.length} child runs under ${PARENT}, ` +
      `expected ${EXPECT_CHILDREN}`,
  );
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1920, height: 1080 },
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  context.setDefaultTimeout(UI_TIMEOUT);
  page = context.pages()[0] || (await context.newPage());
  page.on('pageerror', (err) => console.log('[page error]', err.message));
  const shots = [
    ...(await checkPrintedLinks(page, truth)), // first, while the profile is fresh
    ...(await checkRunsList(page, truth)),
    ...(await checkCompare(page, truth)),
    ...(await checkParentArtifacts(page, truth)),
  ];
  log('all checks passed; screenshots:');
  for (const s of shots) console.log(s);
} catch (err) {
  exitCode = 1;
  console.error(err instanceof CheckError ? `CHECK FAILED: ${err.message}` : err.stack || err);
  if (page) {
    try {
      const file = path.join(SHOTS, 'failure.png');
      await page.screenshot({ path: file, fullPage: true });
      console.error(`failure screenshot: ${file} (at ${page.url()})`);
    } catch {
      // the page is gone; nothing to capture
    }
  }
} finally {
  if (context) await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(exitCode);
