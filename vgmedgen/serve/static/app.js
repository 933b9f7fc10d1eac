// The VG-MedGen page: plain JavaScript, no build step, no external files. Every URL is relative, so the
// page works wherever the application is mounted.
"use strict";

const TOKEN_KEY = "vgmedgen.token";
// Offered when the served models carry no example prompts of their own.
const BUILTIN_EXAMPLES = [
  { anatomy_prompt: "a small round lesion in the centre with a regular border",
    style_prompt: "dark brown lesion on light skin, even lighting" },
  { anatomy_prompt: "a large irregular lesion in the upper left with a blurred border",
    style_prompt: "pink lesion, vignetted illumination, hair" },
  { anatomy_prompt: "two small oval lesions near the bottom edge",
    style_prompt: "light brown lesions on dark skin, ruler marks" },
];

const $ = (id) => document.getElementById(id);
const state = { models: [], limits: {}, tokenRequired: false, gridUrl: null };

// -- the token -------------------------------------------------------------------------------------

function showToken(required) {
  $("token-row").hidden = false;
  if (required) $("token").required = true;
}

function readToken() {
  return $("token").value.trim();
}

// -- calling the API ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status, detail, notes) {
    super(message);
    this.status = status;
    this.detail = detail || [];
    this.notes = notes || [];
  }
}

async function api(path, body) {
  const headers = { Accept: "application/json, image/png" };
  const token = readToken();
  if (token) headers.Authorization = "Bearer " + token;
  const init = { method: body === undefined ? "GET" : "POST", headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError("the server did not answer (" + err.message + ")", 0);
  }
  if (response.ok) return response;
  let text = "";
  let payload = null;
  try {
    text = await response.text();
    payload = JSON.parse(text);
  } catch (err) {
    payload = null;
  }
  // The API answers {"error": ...}; anything else (a proxy's page, FastAPI's {"detail": ...}) is shown
  // as it came, cut short.
  const message =
    (payload && typeof payload.error === "string" && payload.error) ||
    (payload && typeof payload.detail === "string" && payload.detail) ||
    (text && !payload ? text.slice(0, 300) : "") ||
    (response.status + " " + response.statusText).trim();
  if (payload && !Array.isArray(payload.detail)) payload.detail = [];
  const notes = [];
  if (response.status === 401 || response.status === 403) {
    showToken(true);
    notes.push(token ? "Check the token above." : "Enter the server's token above.");
  }
  if (response.status === 503) {
    const wait = response.headers.get("Retry-After");
    notes.push("The server is busy" + (wait ? ": retry after " + wait + " s (Retry-After)." : "; retry later."));
  }
  if (response.status === 504) notes.push("Ask for fewer images or steps.");
  if (payload && payload.served) notes.push("Served models: " + payload.served.join(", "));
  const requestId = response.headers.get("X-Request-ID");
  if (requestId) notes.push("Request id " + requestId);
  throw new ApiError(message, response.status, payload && payload.detail, notes);
}

// -- messages ----------------------------------------------------------------------------------------

function clearError() {
  const box = $("error");
  box.hidden = true;
  box.textContent = "";
}

function showError(err) {
  const box = $("error");
  box.textContent = "";
  const head = document.createElement("strong");
  head.className = "message";
  const many = err.detail && err.detail.length > 1;
  // With several problems the message lists them again, line by line: the list below shows them once.
  const message = many ? err.message.split("\n")[0] : err.message;
  head.textContent = (err.status ? "Error " + err.status + ": " : "Error: ") + message;
  box.appendChild(head);
  if (many) {
    const list = document.createElement("ul");
    for (const d of err.detail) {
      const item = document.createElement("li");
      item.textContent = d.field + ": " + d.message + (d.value !== undefined ? " (got " + d.value + ")" : "");
      list.appendChild(item);
    }
    box.appendChild(list);
  } else if (err.detail && err.detail.length === 1 && err.detail[0].value !== undefined) {
    const value = document.createElement("div");
    value.textContent = "got " + err.detail[0].value;
    box.appendChild(value);
  }
  for (const note of err.notes || []) {
    const line = document.createElement("div");
    line.className = "muted";
    line.textContent = note;
    box.appendChild(line);
  }
  box.hidden = false;
}

// Runs `work` with the button disabled and a ticking status line; errors go to the error box.
async function busy(button, status, label, work) {
  clearError();
  button.disabled = true;
  const start = performance.now();
  const tick = () => {
    status.textContent = label + " " + ((performance.now() - start) / 1000).toFixed(1) + " s";
  };
  tick();
  const timer = setInterval(tick, 100);
  try {
    await work();
    status.textContent = "done in " + ((performance.now() - start) / 1000).toFixed(2) + " s";
  } catch (err) {
    status.textContent = "";
    showError(err instanceof ApiError ? err : new ApiError(String(err.message || err), 0));
  } finally {
    clearInterval(timer);
    button.disabled = false;
  }
}

// -- models ------------------------------------------------------------------------------------------

function currentModel() {
  return state.models.find((m) => m.name === $("model").value) || state.models[0] || null;
}

function examples() {
  const model = currentModel();
  const own = model && model.example_prompts && model.example_prompts.length ? model.example_prompts : null;
  return own || BUILTIN_EXAMPLES;
}

function applyModel() {
  const model = currentModel();
  if (!model) return;
  const sampler = model.sampler || {};
  $("steps").placeholder = sampler.num_steps !== undefined ? String(sampler.num_steps) : "default";
  $("grid-steps").placeholder = $("steps").placeholder;
  $("guidance-anatomy").placeholder = sampler.guidance_anatomy !== undefined ? String(sampler.guidance_anatomy) : "default";
  $("guidance-style").placeholder = sampler.guidance_style !== undefined ? String(sampler.guidance_style) : "default";
  const parts = [model.resolution + "×" + model.resolution + " px", "version " + model.version_id.slice(0, 12)];
  if (model.aliases && model.aliases.length) parts.push(model.aliases.join(", "));
  $("model-info").textContent = parts.join(" · ");
  $("model-info").title = model.ref + "\n" + model.version_id;
  const select = $("example");
  select.length = 1;
  examples().forEach((ex, i) => {
    const option = document.createElement("option");
    option.value = String(i);
    option.textContent = ex.anatomy_prompt + " | " + ex.style_prompt;
    select.appendChild(option);
  });
}

function applyLimits() {
  const limits = state.limits;
  if (limits.max_images) $("n").max = limits.max_images;
  if (limits.max_steps) {
    $("steps").max = limits.max_steps;
    $("grid-steps").max = limits.max_steps;
  }
  if (limits.max_prompt_chars) {
    for (const id of ["anatomy", "style"]) $(id).maxLength = limits.max_prompt_chars;
  }
  countCells();
}

async function loadModels() {
  const select = $("model");
  try {
    const body = await (await api("v1/models")).json();
    state.models = body.models || [];
    state.limits = body.limits || {};
    state.tokenRequired = !!body.token_required;
    if (state.tokenRequired) showToken(true);
    const previous = select.value;
    select.textContent = "";
    for (const m of state.models) {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.name + (m.default ? " (default)" : "");
      select.appendChild(option);
    }
    if (state.models.some((m) => m.name === previous)) select.value = previous;
    select.disabled = state.models.length === 0;
    applyModel();
    applyLimits();
    clearError();
    return true;
  } catch (err) {
    select.textContent = "";
    const option = document.createElement("option");
    option.value = "";
    option.textContent = "models not loaded";
    select.appendChild(option);
    showError(err instanceof ApiError ? err : new ApiError(String(err), 0));
    return false;
  }
}

// -- the Generate tab --------------------------------------------------------------------------------

// The value of a number input: undefined when empty; a field the browser cannot read as a number stops
// the request (otherwise it would silently be left out).
function numberField(id, label) {
  const input = $(id);
  if (input.validity.badInput) throw new ApiError(label + " is not a number", 0);
  if (input.value.trim() === "") return undefined;
  return Number(input.value);
}

function textField(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : text;
}

function slug(text) {
  return String(text).replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^-+|-+$/g, "") || "model";
}

function generateBody() {
  const body = {
    anatomy_prompt: textField("anatomy"),
    style_prompt: textField("style"),
    seed: numberField("seed", "seed"),
    n: numberField("n", "images"),
    steps: numberField("steps", "steps"),
    guidance_anatomy: numberField("guidance-anatomy", "guidance anatomy"),
    guidance_style: numberField("guidance-style", "guidance style"),
    model: $("model").value || undefined,
    return_masks: $("masks").checked,
    format: "json",
  };
  if (body.n === undefined) body.n = 1;
  return body;
}

function imageCard(image, modelName) {
  const figure = document.createElement("figure");
  figure.className = "card";
  const pair = document.createElement("div");
  pair.className = "pair";
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + image.png_base64;
  img.alt = "synthetic image, seed " + image.seed;
  img.title = "seed " + image.seed;
  pair.appendChild(img);
  let maskUrl = null;
  if (image.mask_png_base64) {
    maskUrl = "data:image/png;base64," + image.mask_png_base64;
    const mask = document.createElement("img");
    mask.className = "mask";
    mask.src = maskUrl;
    mask.alt = "pseudo-mask, seed " + image.seed;
    mask.title = "pseudo-mask, seed " + image.seed;
    pair.appendChild(mask);
  }
  figure.appendChild(pair);
  const caption = document.createElement("figcaption");
  const seed = document.createElement("span");
  seed.append("seed ");
  const value = document.createElement("span");
  value.className = "seed";
  value.textContent = String(image.seed);
  seed.appendChild(value);
  caption.appendChild(seed);
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.textContent = "reuse";
  reuse.title = "put this seed in the form (n = 1 reproduces this image)";
  reuse.addEventListener("click", () => {
    $("seed").value = String(image.seed);
    $("n").value = "1";
  });
  caption.appendChild(reuse);
  const name = "vgmedgen_" + slug(modelName) + "_seed" + image.seed;
  const link = document.createElement("a");
  link.href = img.src;
  link.download = name + ".png";
  link.textContent = "PNG";
  caption.appendChild(link);
  if (maskUrl) {
    const maskLink = document.createElement("a");
    maskLink.href = maskUrl;
    maskLink.download = name + "_mask.png";
    maskLink.textContent = "mask";
    caption.appendChild(maskLink);
  }
  figure.appendChild(caption);
  return figure;
}

function fmt(seconds) {
  return typeof seconds === "number" ? seconds.toFixed(2) + " s" : "?";
}

function showResult(body) {
  const p = body.parameters || {};
  const t = body.timing || {};
  const info = $("result-info");
  info.textContent = "";
  const add = (label, value) => {
    if (info.childNodes.length) info.append(" · ");
    info.append(label);
    const code = document.createElement("code");
    code.textContent = value;
    info.appendChild(code);
  };
  add("model ", body.model.name);
  add("version ", body.model.version_id.slice(0, 12));
  add("steps ", String(p.steps));
  add("g_a ", String(p.guidance_anatomy));
  add("g_s ", String(p.guidance_style));
  add("seeds ", p.n > 1 ? p.seed + "–" + (p.seed + p.n - 1) : String(p.seed));
  add("time ", fmt(t.total_s) + " (sampling " + fmt(t.sample_s) + ", batch of " + t.batch_images + ")");
  info.title = "version " + body.model.version_id + "\nrequest " + body.request_id;
  info.hidden = false;
  const images = $("images");
  images.textContent = "";
  for (const image of body.images) images.appendChild(imageCard(image, body.model.name));
  $("params").textContent = JSON.stringify({ request_id: body.request_id, model: body.model, parameters: p }, null, 2);
  $("params-box").hidden = false;
}

async function generate(event) {
  event.preventDefault();
  await busy($("generate"), $("status"), "generating…", async () => {
    const body = generateBody();
    const response = await api("v1/generate", body);
    showResult(await response.json());
  });
}

// -- the Grid tab ------------------------------------------------------------------------------------

function lines(id) {
  return $(id).value.split("\n").map((s) => s.trim()).filter((s) => s !== "");
}

function countCells() {
  const rows = lines("grid-anatomy").length;
  const cols = lines("grid-style").length;
  const max = state.limits.max_grid_cells;
  $("grid-cells").textContent = rows + " × " + cols + " = " + rows * cols + " cells" + (max ? " (at most " + max + ")" : "");
}

function fillGridExamples() {
  const ex = examples();
  const max = state.limits.max_grid_cells || 16;
  const anatomy = [...new Set(ex.map((e) => e.anatomy_prompt))];
  const style = [...new Set(ex.map((e) => e.style_prompt))];
  const cols = Math.min(style.length, 3, max);
  const rows = Math.min(anatomy.length, 3, Math.max(1, Math.floor(max / cols)));
  $("grid-anatomy").value = anatomy.slice(0, rows).join("\n");
  $("grid-style").value = style.slice(0, cols).join("\n");
  countCells();
}

async function drawGrid(event) {
  event.preventDefault();
  await busy($("grid-generate"), $("grid-status"), "generating…", async () => {
    const seed = numberField("grid-seed", "seed");
    const body = {
      anatomy_prompts: lines("grid-anatomy"),
      style_prompts: lines("grid-style"),
      seed: seed === undefined ? 0 : seed,
      steps: numberField("grid-steps", "steps"),
      model: $("model").value || undefined,
      format: "png",
    };
    const response = await api("v1/grid", body);
    const blob = await response.blob();
    const version = response.headers.get("X-Model-Version") || "";
    if (state.gridUrl) URL.revokeObjectURL(state.gridUrl);
    state.gridUrl = URL.createObjectURL(blob);
    const img = $("grid-image");
    img.style.width = "";
    img.onload = () => {
      // Small images scaled up by a whole factor, so that pixels stay square and sharp.
      const room = Math.max(1, $("panel-grid").clientWidth);
      const scale = Math.max(1, Math.min(4, Math.floor(room / img.naturalWidth)));
      img.style.width = img.naturalWidth * scale + "px";
    };
    img.src = state.gridUrl;
    const name = "vgmedgen_" + slug(body.model || (currentModel() || {}).name || "model") + "_grid_seed" + body.seed + ".png";
    const link = $("grid-download");
    link.href = state.gridUrl;
    link.download = name;
    $("grid-info").textContent =
      body.anatomy_prompts.length + " × " + body.style_prompts.length + " grid, seed " + body.seed +
      (version ? " · version " + version.slice(0, 12) : "");
    $("grid-result").hidden = false;
  });
}

// -- tabs and start-up -------------------------------------------------------------------------------

function selectTab(name) {
  for (const tab of ["generate", "grid"]) {
    const on = tab === name;
    $("tab-" + tab).setAttribute("aria-selected", on ? "true" : "false");
    $("panel-" + tab).hidden = !on;
  }
  if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
}

function submitOnCtrlEnter(textarea, form) {
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
}

function start() {
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) {
    $("token").value = saved;
    showToken(false);
  }
  const tokenChanged = () => {
    const token = readToken();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    if (!state.models.length) loadModels();
  };
  $("token").addEventListener("change", tokenChanged);
  $("token-row").addEventListener("submit", (event) => {
    event.preventDefault();
    tokenChanged();
  });
  $("tab-generate").addEventListener("click", () => selectTab("generate"));
  $("tab-grid").addEventListener("click", () => selectTab("grid"));
  $("model").addEventListener("change", applyModel);
  $("example").addEventListener("change", () => {
    const ex = examples()[Number($("example").value)];
    if (ex && $("example").value !== "") {
      $("anatomy").value = ex.anatomy_prompt;
      $("style").value = ex.style_prompt;
    }
    $("example").value = "";
  });
  $("zoom").addEventListener("input", () => {
    document.documentElement.style.setProperty("--cell", $("zoom").value + "px");
  });
  $("generate-form").addEventListener("submit", generate);
  $("grid-form").addEventListener("submit", drawGrid);
  $("grid-examples").addEventListener("click", fillGridExamples);
  for (const id of ["grid-anatomy", "grid-style"]) $(id).addEventListener("input", countCells);
  submitOnCtrlEnter($("anatomy"), $("generate-form"));
  submitOnCtrlEnter($("style"), $("generate-form"));
  submitOnCtrlEnter($("grid-anatomy"), $("grid-form"));
  submitOnCtrlEnter($("grid-style"), $("grid-form"));
  selectTab(location.hash === "#grid" ? "grid" : "generate");
  loadModels();
}

start();
