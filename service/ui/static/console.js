// DiffFit Serve web console. Plain JS, no build, no library.
// The API key lives in this tab's sessionStorage; every call sends it as a Bearer
// token, so the API's own authentication (and tenant scoping) applies unchanged.
// Images behind auth are fetched and shown as blob: URLs; the job stream is read
// with fetch() (EventSource cannot send an Authorization header).
"use strict";

const KEY = "difffit-api-key";
const $ = (id) => document.getElementById(id);
const key = () => sessionStorage.getItem(KEY);

function say(text, isError) {
  const s = $("status");
  s.textContent = text || "";
  s.className = isError ? "error" : "";
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${key()}` }, options.headers || {});
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (resp.status === 401) {
    sessionStorage.removeItem(KEY);
    location.href = "/ui/login";
    throw new Error("not logged in");
  }
  if (!resp.ok) {
    let detail = `HTTP ${resp.status}`;
    try { detail = (await resp.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return resp;
}
const getJSON = async (path) => (await api(path)).json();

async function showImage(img, path, alt) {
  const blob = await (await api(path)).blob();
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  img.alt = alt;
  img.hidden = false;
}

function cell(row, text) {
  const td = document.createElement("td");
  if (text instanceof Node) td.appendChild(text); else td.textContent = text;
  row.appendChild(td);
  return td;
}

function link(href, text) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  return a;
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  return s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

// --- pages --------------------------------------------------------------------
const pages = {
  login() {
    $("login-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const candidate = $("api-key").value.trim();
      const resp = await fetch("/adapters", { headers: { Authorization: `Bearer ${candidate}` } });
      if (!resp.ok) { say("That key was not accepted.", true); return; }
      sessionStorage.setItem(KEY, candidate);
      location.href = "/ui";
    });
  },

  async jobs() {
    const body = $("jobs").tBodies[0];
    for (const job of (await getJSON("/jobs?limit=50")).jobs) {
      const row = body.insertRow();
      cell(row, link(`/ui/jobs/${job.id}`, job.id.slice(0, 12)));
      cell(row, job.adapter);
      cell(row, job.state);
      cell(row, `${job.progress.step} / ${job.progress.total}`);
      cell(row, new Date(job.created_at).toLocaleString());
    }
    if (!body.rows.length) say("No jobs yet.");
  },

  async datasets() {
    const body = $("datasets").tBodies[0];
    const render = async () => {
      body.replaceChildren();
      for (const ds of (await getJSON("/datasets")).datasets) {
        const row = body.insertRow();
        cell(row, ds.id);
        cell(row, ds.filename || "–");
        cell(row, ds.classes.join(", "));
        cell(row, String(ds.images));
        const actions = cell(row, "");
        actions.appendChild(link(`/ui/finetune?dataset=${ds.id}`, "Fine-tune on it"));
        const del = document.createElement("button");
        del.type = "button";
        del.textContent = "Delete";
        del.setAttribute("aria-label", `Delete data set ${ds.id}`);
        del.addEventListener("click", async () => {
          try { await api(`/datasets/${ds.id}`, { method: "DELETE" }); say("Deleted."); await render(); }
          catch (e) { say(e.message, true); }
        });
        actions.append(" ", del);
      }
    };
    $("upload-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const form = new FormData();
      form.append("file", $("dataset-file").files[0]);
      say("Uploading and checking…");
      try {
        const ds = await (await api("/datasets", { method: "POST", body: form })).json();
        say(`Uploaded ${ds.id}: ${ds.images} images in ${ds.classes.length} classes (${ds.classes.join(", ")}).`);
        await render();
      } catch (e) { say(`Upload refused: ${e.message}`, true); }
    });
    await render();
  },

  async finetune() {
    const select = $("dataset");
    const wanted = new URLSearchParams(location.search).get("dataset");
    for (const ds of (await getJSON("/datasets")).datasets) {
      const opt = new Option(`${ds.filename || ds.id} (${ds.images} images, ${ds.classes.length} classes)`, ds.id);
      opt.selected = ds.id === wanted;
      select.add(opt);
    }
    if (!select.options.length) say("Upload a data set first.", true);
    $("finetune-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const steps = Number($("steps").value);
      const body = {
        dataset_id: select.value,
        adapter: $("adapter").value,
        steps,
        batch_size: Number($("batch-size").value),
        learning_rate: Number($("learning-rate").value),
        method: $("method").value,
        seed: Number($("seed").value || 0),
        preview_every: Number($("preview-every").value) || Math.max(1, Math.floor(steps / 10)),
      };
      try {
        const job = await (await api("/finetune", {
          method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
        })).json();
        location.href = `/ui/jobs/${job.id}`;
      } catch (e) { say(`Not started: ${e.message}`, true); }
    });
  },

  async job() {
    const id = document.body.dataset.job;
    const losses = [];
    const showJob = (job) => {
      $("job-adapter").textContent = job.adapter;
      $("job-state").textContent = job.state;
      $("job-step").textContent = `${job.progress.step} / ${job.progress.total}`;
      $("job-progress").max = job.progress.total || 1;
      $("job-progress").value = job.progress.step;
      if (job.progress.loss !== null) $("job-loss").textContent = job.progress.loss.toFixed(4);
      $("job-eta").textContent = fmtSeconds(job.progress.eta_s);
      if (job.error) {
        $("job-error").textContent = `${job.error.code}: ${job.error.message}`;
        $("job-error").hidden = false;
      }
    };
    const drawLoss = () => {
      const svg = $("loss-curve");
      if (losses.length < 2) return;
      const lo = Math.min(...losses), hi = Math.max(...losses), span = hi - lo || 1;
      const pts = losses.map((l, i) => `${(i / (losses.length - 1)) * 396 + 2},${118 - ((l - lo) / span) * 112}`);
      svg.innerHTML = `<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="${pts.join(" ")}"/>`;
      svg.setAttribute("aria-label", `Training loss over ${losses.length} steps, from ${losses[0].toFixed(3)} to ${losses[losses.length - 1].toFixed(3)}`);
    };
    const finish = async (job) => {
      showJob(job);
      $("cancel-job").disabled = true;
      if (job.state === "succeeded" && job.adapter_version) {
        const path = `/adapters/${job.adapter}/versions/${job.adapter_version}/files/samples.png`;
        await showImage($("grid-img"), path, `Sample grid of ${job.adapter} version ${job.adapter_version}, one row per class`);
        $("grid-caption").textContent = `${job.adapter} version ${job.adapter_version}: 4 samples per class.`;
        $("job-adapter-link").href = `/ui/adapters/${job.adapter}`;
        $("job-adapter-link").hidden = false;
      }
      say(`Job ${job.state}.`, job.state === "failed");
    };
    $("cancel-job").addEventListener("click", async () => {
      try { await api(`/jobs/${id}/cancel`, { method: "POST" }); say("Cancel requested."); }
      catch (e) { say(e.message, true); }
    });
    showJob(await getJSON(`/jobs/${id}`));
    const onEvent = async (kind, data) => {
      if (kind === "progress") {
        losses.push(...(data.losses || []));
        drawLoss();
        showJob({ adapter: $("job-adapter").textContent, state: "running", error: null,
          progress: { step: data.step, total: data.total, loss: data.loss, eta_s: data.eta_s } });
      } else if (kind === "preview") {
        await showImage($("preview-img"), data.url, `Preview samples at step ${data.step}, one row per class`);
        $("preview-caption").textContent = `Preview at step ${data.step} (drawn by the adapter being trained).`;
      } else if (kind === "end") {
        await finish(data);
      } else if (kind === "running" || kind === "dataset") {
        $("job-state").textContent = "running";
      }
    };
    await followEvents(`/jobs/${id}/events`, onEvent);
  },

  async adapters() {
    const body = $("adapters").tBodies[0];
    for (const a of (await getJSON("/adapters")).adapters) {
      const row = body.insertRow();
      cell(row, link(`/ui/adapters/${a.name}`, a.name));
      cell(row, String(a.latest_version));
      cell(row, String(a.num_versions));
      cell(row, a.class_names.join(", "));
    }
    if (!body.rows.length) say("No adapters yet: fine-tune one.");
  },

  async adapter() {
    const name = document.body.dataset.name;
    const adapter = await getJSON(`/adapters/${name}`);
    const box = $("versions");
    for (const v of adapter.versions.slice().reverse()) {
      const sec = document.createElement("section");
      sec.setAttribute("aria-labelledby", `v${v.version}-h`);
      sec.innerHTML = `<h2 id="v${v.version}-h"></h2><p class="meta"></p>`;
      sec.querySelector("h2").textContent = `Version ${v.version}`;
      sec.querySelector(".meta").textContent =
        `${v.method}, ${v.num_classes} classes (${v.class_names.join(", ")}), ${v.trainable_params} trainable parameters, ` +
        `${v.job_id ? `trained by job ${v.job_id.slice(0, 12)}` : "imported"}, ${new Date(v.created_at).toLocaleString()}`;
      const dl = document.createElement("button");
      dl.type = "button";
      dl.textContent = `Download version ${v.version} (.safetensors)`;
      dl.addEventListener("click", async () => {
        const blob = await (await api(v.file_urls["adapter.safetensors"])).blob();
        const a = link(URL.createObjectURL(blob), "");
        a.download = `${name}-v${v.version}.safetensors`;
        document.body.appendChild(a);
        a.click();
        a.remove();
      });
      sec.appendChild(dl);
      if (v.file_urls["samples.png"]) {
        const img = document.createElement("img");
        sec.appendChild(img);
        showImage(img, v.file_urls["samples.png"], `Sample grid of version ${v.version}, one row per class`);
      }
      box.appendChild(sec);
    }
    $("delete-adapter").addEventListener("click", async () => {
      if (!confirm(`Delete adapter ${name} and all its versions?`)) return;
      try { await api(`/adapters/${name}`, { method: "DELETE" }); location.href = "/ui/adapters"; }
      catch (e) { say(e.message, true); }
    });
  },

  async generate() {
    const adapterSel = $("gen-adapter"), classSel = $("gen-class");
    const adapters = (await getJSON("/adapters")).adapters;
    for (const a of adapters) adapterSel.add(new Option(`${a.name} (v${a.latest_version})`, a.name));
    const wanted = new URLSearchParams(location.search).get("adapter");
    if (wanted) adapterSel.value = wanted;
    const fillClasses = () => {
      const a = adapters.find((x) => x.name === adapterSel.value);
      classSel.replaceChildren();
      if (a) a.class_names.forEach((c) => classSel.add(new Option(c, c)));
      else for (let i = 0; i < 10; i++) classSel.add(new Option(`class ${i}`, String(i)));
    };
    adapterSel.addEventListener("change", fillClasses);
    fillClasses();
    $("generate-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const q = new URLSearchParams({
        class: classSel.value, n: $("gen-n").value, seed: $("gen-seed").value,
        steps: $("gen-steps").value, guidance_scale: $("gen-guidance").value,
      });
      if (adapterSel.value) q.set("adapter", adapterSel.value);
      say("Generating…");
      try {
        const out = await (await api(`/generate?${q}`, { method: "POST", headers: { Accept: "application/json" } })).json();
        const box = $("images");
        box.replaceChildren();
        out.images.forEach((b64, i) => {
          const img = document.createElement("img");
          img.src = `data:image/png;base64,${b64}`;
          img.alt = `${out.class_name || `class ${out.class}`}, image ${i + 1} of ${out.n}, seed ${out.seed}`;
          box.appendChild(img);
        });
        say(`${out.n} images of ${out.class_name || out.class} in ${out.seconds.toFixed(1)} s.`);
      } catch (e) { say(`Failed: ${e.message}`, true); }
    });
  },
};

// Server-sent events over fetch, resumed from the last id when the connection drops.
async function followEvents(path, onEvent) {
  let last = 0;
  for (let attempt = 0; attempt < 20; attempt++) {
    try {
      const resp = await api(path, { headers: { Accept: "text/event-stream", "Last-Event-ID": String(last) } });
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let kind = "message", data = "", id = null;
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) kind = line.slice(6).trim();
            else if (line.startsWith("data:")) data += line.slice(5).trim();
            else if (line.startsWith("id:")) id = line.slice(3).trim();
          }
          if (!data) continue;
          if (id) last = Number(id);
          await onEvent(kind, JSON.parse(data));
          if (kind === "end") return;
        }
      }
    } catch (e) {
      say(`Stream interrupted (${e.message}); reconnecting…`, true);
    }
    await new Promise((r) => setTimeout(r, 1000 * Math.min(attempt + 1, 5)));
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  const page = document.body.dataset.page;
  if (page !== "login" && !key()) { location.href = "/ui/login"; return; }
  const logout = $("logout");
  if (logout) logout.addEventListener("click", () => { sessionStorage.removeItem(KEY); location.href = "/ui/login"; });
  try { await pages[page](); } catch (e) { say(e.message, true); }
  document.body.dataset.ready = "true";
});
