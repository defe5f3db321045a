// The sampler's page: compare two versions on the same seeds, draw and edit, promote or
// reject. Plain JavaScript over the HTTP API the page is served with; nothing is fetched
// from anywhere else. The key is kept in this tab's sessionStorage only.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "ldmflow-key";
const page = { model: null, versions: [], path: [], sized: false };

function key() {
  return sessionStorage.getItem(KEY) || "";
}

function say(text, ok = false) {
  $("status").textContent = text;
  $("status").className = ok ? "ok" : "";
}

async function api(path, body) {
  const headers = { "content-type": "application/json" };
  if (key()) headers.authorization = "Bearer " + key();
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

// Runs an action, showing its refusal (a wrong key, a field) instead of failing silently.
function guarded(action) {
  return async (event) => {
    if (event) event.preventDefault();
    say("working…", true);
    try {
      await action();
      say("");
    } catch (error) {
      say(error.message);
    }
  };
}

function showImages(target, images, titles = []) {
  target.replaceChildren(...images.map((encoded, i) => {
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + encoded;
    img.alt = titles[i] || "";
    img.title = titles[i] || "";
    return img;
  }));
}

// The condition inputs a model takes: a class select, a prompt, or nothing (what was chosen
// is kept when the page reloads its model).
function conditionInputs() {
  const info = page.model;
  for (const span of document.querySelectorAll(".condition")) {
    const source = span.classList.contains("source");
    const chosen = span.querySelector(".condition-value")?.value;
    span.replaceChildren();
    if (!info || info.conditioning === "none") continue;
    const label = document.createElement("label");
    const what = source ? "To" : (info.conditioning === "class" ? "Label" : "Prompt");
    label.append(what + " ");
    let input;
    if (info.conditioning === "class") {
      input = document.createElement("select");
      info.class_names.forEach((name, index) => input.append(new Option(name, String(index))));
    } else {
      input = document.createElement("input");
      input.type = "text";
      input.size = 24;
      input.value = "";
    }
    input.className = "condition-value";
    if (chosen !== undefined) input.value = chosen;
    label.append(input);
    span.append(label);
  }
}

function condition(form) {
  const input = form.querySelector(".condition-value");
  if (!input || !page.model) return {};
  return page.model.conditioning === "class" ? { label: Number(input.value) } : { prompt: input.value };
}

function versionChoices() {
  const choices = [];
  for (const v of page.versions) {
    for (const alias of v.aliases) choices.push([alias, `${alias} (version ${v.version})`]);
  }
  for (const v of page.versions) choices.push([v.version, `version ${v.version}`]);
  for (const [id, fallback] of [["left", "candidate"], ["right", "production"], ["draw-version", "production"],
                                ["promote-version", "candidate"]]) {
    const select = $(id);
    const kept = select.value;
    select.replaceChildren(...choices.map(([value, text]) => new Option(text, value)));
    const wanted = kept || fallback;
    if (choices.some(([value]) => value === wanted)) select.value = wanted;
  }
}

function describe(version) {
  const v = page.versions.find((x) => x.version === version || x.aliases.includes(version));
  if (!v) return "";
  const scores = Object.entries(v.metrics).map(([k, x]) => `${k} ${x.toPrecision(4)}`).join(", ") || "not evaluated";
  const tags = v.tags;
  return [`version ${v.version}${v.aliases.length ? " (" + v.aliases.join(", ") + ")" : ""}: ${scores}`,
          `run ${tags["ldmflow.run_id"] || v.run_id || "?"}`,
          `autoencoder ${tags["ldmflow.autoencoder"] || "?"}`,
          `dataset ${tags["ldmflow.image_dataset"] || "?"}`].join("\n");
}

function versionRows() {
  const body = $("versions").tBodies[0];
  body.replaceChildren(...page.versions.map((v) => {
    const row = document.createElement("tr");
    const decision = v.tags["ldmflow.promotion.decision"];
    const cells = [v.version, v.aliases.join(", "),
                   Object.entries(v.metrics).map(([k, x]) => `${k} ${x.toPrecision(4)}`).join(", "),
                   v.tags["ldmflow.run_id"] || v.run_id || "", decision ? `${decision} by ${v.tags["ldmflow.promotion.by"] || "?"}` : ""];
    row.replaceChildren(...cells.map((text) => {
      const cell = document.createElement("td");
      cell.textContent = text;
      return cell;
    }));
    return row;
  }));
}

async function load() {
  page.model = await api("/v1/model");
  $("model-name").textContent = `${page.model.name || page.model.uri}`;
  const listed = await api("/v1/versions");
  page.versions = listed.versions;
  if (!page.sized || $("mask-canvas").width !== page.model.resolution) {  // resizing clears what was drawn
    page.sized = true;
    for (const canvas of [$("source-canvas"), $("mask-canvas")]) canvas.width = canvas.height = page.model.resolution;
    clearMask();
    $("steps").value = page.model.defaults.steps;
  }
  conditionInputs();
  versionChoices();
  versionRows();
}

async function compare() {
  const body = { ...condition($("compare-form")), seed: Number($("seed").value), n: Number($("n").value),
                 steps: Number($("steps").value) };
  const sides = [["left", $("left").value], ["right", $("right").value]];
  const drawn = await Promise.all(sides.map(([, version]) => api("/v1/generate", { ...body, version })));
  sides.forEach(([side, version], i) => {
    showImages($(`${side}-images`), drawn[i].images, drawn[i].seeds.map((s) => `seed ${s}`));
    $(`${side}-about`).textContent = describe(drawn[i].model.version) || describe(version);
    $(`${side}-images`).dataset.version = drawn[i].model.version;
  });
}

async function generate() {
  const drawn = await api("/v1/generate", { ...condition($("draw-form")), version: $("draw-version").value,
                                            seed: Number($("draw-seed").value), n: Number($("draw-n").value) });
  showImages($("draw-images"), drawn.images, drawn.seeds.map((s) => `seed ${s}`));
}

async function interpolate() {
  const slider = $("at");
  const drawn = await api("/v1/interpolate", { ...condition($("draw-form")), version: $("draw-version").value,
                                               seed: Number($("draw-seed").value), to_seed: Number($("to-seed").value),
                                               n: Number(slider.max) + 1 });
  page.path = drawn.images;
  slider.disabled = false;
  slider.value = 0;
  showPathImage();
}

function showPathImage() {
  const at = Number($("at").value);
  if (page.path.length) showImages($("path-image"), [page.path[at]], [`${at} / ${page.path.length - 1} of the way`]);
}

// The uploaded image, drawn into the source canvas at the model's resolution (centre crop of
// the short side, as the server prepares it).
function upload() {
  const file = $("upload").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const image = new Image();
    image.onload = () => {
      const canvas = $("source-canvas");
      const side = Math.min(image.width, image.height);
      const context = canvas.getContext("2d");
      context.imageSmoothingEnabled = true;
      context.drawImage(image, (image.width - side) / 2, (image.height - side) / 2, side, side,
                        0, 0, canvas.width, canvas.height);
      clearMask();
    };
    image.onerror = () => say("upload: not an image the browser can read");
    image.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function clearMask() {
  const canvas = $("mask-canvas");
  const context = canvas.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, canvas.width, canvas.height);
}

// Painting the mask: white where new content goes, a square brush of 1/8 of the side.
function paintAt(event) {
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  const x = Math.floor((event.clientX - box.left) / box.width * canvas.width);
  const y = Math.floor((event.clientY - box.top) / box.height * canvas.height);
  const brush = Math.max(1, Math.round(canvas.width / 8));
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(x - Math.floor(brush / 2), y - Math.floor(brush / 2), brush, brush);
}

function painting() {
  const canvas = $("mask-canvas");
  let down = false;
  canvas.addEventListener("mousedown", (event) => { down = true; paintAt(event); });
  canvas.addEventListener("mousemove", (event) => { if (down) paintAt(event); });
  window.addEventListener("mouseup", () => { down = false; });
}

function uploaded() {
  return $("source-canvas").toDataURL("image/png");
}

async function edit() {
  const body = { version: $("draw-version").value, seed: Number($("draw-seed").value), n: 1, image: uploaded(),
                 mode: $("mode").value };
  const target = condition($("edit-form"));
  if (body.mode === "sdedit") Object.assign(body, condition($("draw-form")), { strength: Number($("strength").value) });
  else if (body.mode === "restore") Object.assign(body, condition($("draw-form")));
  else Object.assign(body, target);
  const drawn = await api("/v1/edit", body);
  showImages($("edit-images"), drawn.images, [`${body.mode}, seed ${drawn.seeds[0]}`]);
}

async function inpaint() {
  const drawn = await api("/v1/inpaint", { ...condition($("draw-form")), version: $("draw-version").value,
                                           seed: Number($("draw-seed").value), n: 1, image: uploaded(),
                                           mask: $("mask-canvas").toDataURL("image/png") });
  showImages($("edit-images"), drawn.images, [`inpainted, seed ${drawn.seeds[0]}`]);
}

async function decide(route) {
  const body = { version: $("promote-version").value, reason: $("reason").value };
  if (route === "/v1/promote") body.force = $("force").checked;
  const decision = await api(route, body);
  const verb = route === "/v1/reject" ? "rejected" : (decision.promoted ? "promoted" : "kept production at");
  const subject = decision.promoted || route === "/v1/reject" ? decision.candidate : decision.production;
  $("decision").textContent = `${verb} version ${subject} (by ${decision.by}): ${decision.reason}`;
  await load();
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = key();
  $("key-form").addEventListener("submit", guarded(async () => {
    sessionStorage.setItem(KEY, $("key").value.trim());
    await load();
  }));
  $("compare-form").addEventListener("submit", guarded(compare));
  $("draw-form").addEventListener("submit", guarded(generate));
  $("path-form").addEventListener("submit", guarded(interpolate));
  $("at").addEventListener("input", showPathImage);
  $("upload").addEventListener("change", upload);
  $("edit").addEventListener("click", guarded(edit));
  $("inpaint").addEventListener("click", guarded(inpaint));
  $("clear-mask").addEventListener("click", clearMask);
  $("promote-form").addEventListener("submit", guarded(() => decide("/v1/promote")));
  $("reject").addEventListener("click", guarded(() => decide("/v1/reject")));
  painting();
  clearMask();
  start();
});

// Load at once where the server needs no key, or once a key is given.
async function start() {
  try {
    const health = await (await fetch("/healthz")).json();
    if (health.keys && !key()) {
      say("give a key to start (an API key draws; a promotion key also promotes)", true);
      return;
    }
  } catch (error) {
    say("the server does not answer: " + error.message);
    return;
  }
  guarded(load)();
}
