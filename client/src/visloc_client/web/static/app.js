// visloc web page: upload a photo to /api/locate, show the answer and its evidence.
// Plain JavaScript, no build step; d3-geo, d3-array and topojson-client are loaded before it
// (static/vendor, from npm). All text from the server is set with textContent, never as HTML.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const state = {
    web: null, // the web app's settings (upload limit, tiles)
    service: null, // GetInfo
    land: null,
    borders: null,
    answer: null, // the last /api/locate answer
    view: "world",
    previewUrl: null,
    seq: 0,
    lastFile: null, // the photo last sent: a new claim re-checks it
    projection: null, // the map's, for a click to a place
  };

  // --- small helpers ---------------------------------------------------------------------

  function svgEl(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (parent) parent.appendChild(node);
    return node;
  }

  function svgTitle(node, text) {
    svgEl("title", {}, node).textContent = text;
  }

  function clear(node, keep) {
    for (const child of Array.from(node.childNodes)) {
      if (!keep || !child.matches || !child.matches(keep)) node.removeChild(child);
    }
  }

  function setText(id, text) {
    $(id).textContent = text;
  }

  function fmtBytes(n) {
    if (n >= 1024 * 1024) return `${(n / (1024 * 1024)).toFixed(1)} MB`;
    if (n >= 1024) return `${Math.round(n / 1024)} KB`;
    return `${n} bytes`;
  }

  function fmtDeg(value, pos, neg) {
    return `${Math.abs(value).toFixed(4)}\u00b0\u00a0${value >= 0 ? pos : neg}`;
  }

  function fmtLatLon(lat, lon) {
    return `${fmtDeg(lat, "N", "S")}, ${fmtDeg(lon, "E", "W")}`;
  }

  function fmtKm(km) {
    if (km < 1) return `${Math.round(km * 1000)} m`;
    if (km < 100) return `${km.toFixed(1)} km`;
    return `${Math.round(km).toLocaleString("en")} km`;
  }

  function fmtScale(km) {
    return km >= 1000 ? `${(km / 1000).toLocaleString("en")}k` : `${km}`;
  }

  function haversineKm(lat1, lon1, lat2, lon2) {
    const rad = Math.PI / 180;
    const a =
      Math.sin(((lat2 - lat1) * rad) / 2) ** 2 +
      Math.cos(lat1 * rad) * Math.cos(lat2 * rad) * Math.sin(((lon2 - lon1) * rad) / 2) ** 2;
    return 2 * 6371 * Math.asin(Math.min(1, Math.sqrt(a)));
  }

  // --- status, errors ----------------------------------------------------------------------

  function setStatus(text) {
    setText("status", text);
  }

  function showError(error) {
    document.body.dataset.state = "error";
    setStatus("");
    setText("error-title", error.title || "Something went wrong");
    setText("error-message", error.message || "");
    const reason = $("error-reason");
    if (error.reason) {
      reason.textContent = `The service said: ${error.reason}`;
      reason.hidden = false;
    } else {
      reason.textContent = "";
      reason.hidden = true;
    }
    $("error").hidden = false;
  }

  function hideError() {
    $("error").hidden = true;
  }

  // --- service info --------------------------------------------------------------------------

  async function loadInfo() {
    let body;
    try {
      const resp = await fetch("/api/info", { headers: { Accept: "application/json" }, cache: "no-store" });
      body = await resp.json();
    } catch (err) {
      setText("service-line", "The web app did not answer: reload the page to try again.");
      return;
    }
    state.web = body.web || null;
    state.service = body.service || null;
    if (state.web) {
      const formats = state.web.accepted_formats;
      setText(
        "limits",
        `${formats.slice(0, -1).join(", ")} or ${formats[formats.length - 1]}, up to ${fmtBytes(state.web.max_upload_bytes)}.`
      );
      if (state.web.tiles) {
        const credit = state.web.tiles.attribution ? ` Tiles: ${state.web.tiles.attribution}.` : "";
        setText("map-credit", `Map: Natural Earth 1:110m (world-atlas).${credit}`);
      }
    }
    const s = state.service;
    if (s) {
      setText(
        "service-line",
        `Model ${s.model_name} ${s.model_version} \u00b7 background ${s.background_version} ` +
          `(${Number(s.num_background).toLocaleString("en")} photos) \u00b7 ${Number(s.num_cells).toLocaleString("en")} cells`
      );
      if (s.bundle_source === "demo") {
        setText(
          "demo-text",
          s.bundle_warning || "This service runs a demo bundle: its answers are arbitrary."
        );
        $("demo-banner").hidden = false;
      } else {
        $("demo-banner").hidden = true;
      }
    } else if (body.error) {
      setText("service-line", `${body.error.title}. ${body.error.message}`);
    }
    drawMap();
  }

  async function loadWorld() {
    try {
      const resp = await fetch("/static/vendor/world-atlas/countries-110m.json");
      const world = await resp.json();
      state.land = topojson.feature(world, world.objects.land);
      state.borders = topojson.mesh(world, world.objects.countries, (a, b) => a !== b);
    } catch (err) {
      state.land = null; // the map still shows the graticule and the markers
    }
    drawMap();
  }

  // --- the map -------------------------------------------------------------------------------

  function regionShape(answer) {
    // A circle around the prediction that holds the neighbours (the evidence).
    const r = answer.result;
    let km = 25;
    for (const n of r.neighbours) km = Math.max(km, haversineKm(r.lat, r.lon, n.lat, n.lon));
    const degrees = Math.min(60, (km * 1.25) / 111.2);
    return d3.geoCircle().center([r.lon, r.lat]).radius(degrees)();
  }

  function makeProjection(width, tiles, region) {
    const pad = 16;
    if (tiles) {
      // Raster tiles are Web Mercator, so the map is too.
      const height = Math.round(width * 0.75);
      const projection = d3.geoMercator();
      if (region) projection.fitExtent([[pad, pad], [width - pad, height - pad]], region);
      else projection.scale(width / (2 * Math.PI)).translate([width / 2, height / 2 + width * 0.04]);
      projection.clipExtent([[0, 0], [width, height]]);
      return { projection, height };
    }
    if (region) {
      const height = Math.round(width * 0.75);
      const c = d3.geoCentroid(region);
      const projection = d3.geoAzimuthalEqualArea().rotate([-c[0], -c[1]]);
      projection.fitExtent([[pad, pad], [width - pad, height - pad]], region);
      projection.clipExtent([[0, 0], [width, height]]);
      return { projection, height };
    }
    const height = Math.round(width * 0.5);
    const projection = d3.geoEqualEarth().fitExtent([[2, 2], [width - 2, height - 2]], { type: "Sphere" });
    return { projection, height };
  }

  function drawTiles(group, projection, width, height, tiles) {
    // Slippy-map tiles covering the view (projection not rotated: lon 0 at translate x).
    const k = projection.scale();
    const [tx, ty] = projection.translate();
    const worldPx = 2 * Math.PI * k;
    const z = Math.max(0, Math.min(tiles.max_zoom, Math.round(Math.log2(worldPx / 256))));
    const n = 2 ** z;
    const size = worldPx / n;
    const x0 = tx - worldPx / 2;
    const y0 = ty - worldPx / 2;
    const cols = [Math.floor(-x0 / size), Math.floor((width - x0) / size)];
    const rows = [Math.max(0, Math.floor(-y0 / size)), Math.min(n - 1, Math.floor((height - y0) / size))];
    if ((cols[1] - cols[0] + 1) * (rows[1] - rows[0] + 1) > 64) return;
    for (let y = rows[0]; y <= rows[1]; y++) {
      for (let x = cols[0]; x <= cols[1]; x++) {
        const wx = ((x % n) + n) % n;
        const href = tiles.url.replace("{z}", z).replace("{x}", wx).replace("{y}", y);
        svgEl("image", { href, x: x0 + x * size, y: y0 + y * size, width: size + 0.5, height: size + 0.5,
          preserveAspectRatio: "none", class: "tile" }, group);
      }
    }
  }

  function drawMap() {
    const svg = $("map");
    const width = Math.max(260, Math.round($("map-box").clientWidth || 800));
    const tiles = state.web && state.web.tiles;
    const answer = state.answer;
    const region = state.view === "region" && answer ? regionShape(answer) : null;
    const { projection, height } = makeProjection(width, tiles, region);
    state.projection = projection;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.classList.toggle("tiled", Boolean(tiles));
    clear(svg, "desc");
    const path = d3.geoPath(projection);
    svgEl("path", { d: path({ type: "Sphere" }) || `M0,0H${width}V${height}H0Z`, class: "sphere" }, svg);
    if (tiles) drawTiles(svgEl("g", { class: "tiles" }, svg), projection, width, height, tiles);
    svgEl("path", { d: path(d3.geoGraticule10()) || "", class: "graticule" }, svg);
    if (state.land) {
      svgEl("path", { d: path(state.land) || "", class: "land" }, svg);
      svgEl("path", { d: path(state.borders) || "", class: "borders" }, svg);
    }
    if (answer) drawMarkers(svg, projection, width, height, answer.result, Boolean(region));
    if (answer && region) drawScaleBar(svg, projection, height, answer.result);
  }

  function place(projection, lon, lat, width, height) {
    const p = projection([lon, lat]);
    if (!p || !Number.isFinite(p[0]) || !Number.isFinite(p[1])) return null;
    if (p[0] < -20 || p[1] < -20 || p[0] > width + 20 || p[1] > height + 20) return null;
    return p;
  }

  function drawScaleBar(svg, projection, height, r) {
    // A bar of a round length near a fifth of the map's width, at the prediction's latitude.
    const a = projection([r.lon, r.lat]);
    const b = projection([r.lon + 1 / Math.max(0.01, Math.cos((r.lat * Math.PI) / 180)) / 111.32, r.lat]);
    if (!a || !b) return;
    const pxPerKm = Math.hypot(b[0] - a[0], b[1] - a[1]);
    if (!(pxPerKm > 0)) return;
    const target = 120 / pxPerKm;
    const pow = 10 ** Math.floor(Math.log10(target));
    const km = [5, 2, 1].map((f) => f * pow).find((v) => v <= target) || pow;
    const px = km * pxPerKm;
    const y = height - 14;
    svgEl("path", { class: "scale-bar", d: `M12,${y - 5}V${y}H${(12 + px).toFixed(1)}V${y - 5}` }, svg);
    svgEl("text", { class: "scale-text", x: 12 + px + 6, y: y + 4 }, svg).textContent = fmtKm(km);
  }

  function drawPrediction(layer, p, r) {
    const g = svgEl("g", { id: "marker", class: "marker-prediction", "data-lat": r.lat, "data-lon": r.lon,
      transform: `translate(${p[0].toFixed(2)},${p[1].toFixed(2)})` }, layer);
    svgTitle(g, `Predicted location: ${fmtLatLon(r.lat, r.lon)}`);
    svgEl("circle", { class: "m-halo", r: 13 }, g);
    svgEl("path", { class: "m-cross", d: "M-19,0H-13M13,0H19M0,-19V-13M0,13V19" }, g);
    svgEl("circle", { class: "m-dot", r: 5 }, g);
  }

  function drawMarkers(svg, projection, width, height, r, zoomed) {
    const layer = svgEl("g", { class: "markers" }, svg);
    const p = place(projection, r.lon, r.lat, width, height);
    // Zoomed in, the evidence is drawn over the prediction's ring so that it stays visible;
    // on the world map it would sit exactly on the prediction, which then goes on top.
    if (p && zoomed) drawPrediction(layer, p, r);
    r.top_cells.forEach((c, i) => {
      const p = place(projection, c.lon, c.lat, width, height);
      if (!p) return;
      const m = svgEl("rect", { class: "m-cell", x: p[0] - 5, y: p[1] - 5, width: 10, height: 10,
        "data-cell": c.id }, layer);
      svgTitle(m, `Cell ${c.id} (#${i + 1}): probability ${(c.probability * 100).toFixed(1)}%`);
    });
    // Neighbours outside the chosen cluster first, the evidence on top of them.
    const order = r.neighbours.map((n, i) => [n, i]).sort((a, b) => Number(a[0].in_prediction) - Number(b[0].in_prediction));
    for (const [n, i] of order) {
      const p = place(projection, n.lon, n.lat, width, height);
      if (!p) continue;
      const m = svgEl("circle", { class: n.in_prediction ? "m-evidence" : "m-neighbour", cx: p[0], cy: p[1], r: 4.5,
        "data-row": n.row_id }, layer);
      svgTitle(m, `Neighbour #${i + 1}: similarity ${n.similarity.toFixed(3)}, ${fmtLatLon(n.lat, n.lon)}`);
    }
    if (p && !zoomed) drawPrediction(layer, p, r);
    (r.claims || []).forEach((c) => {
      c.neighbours.forEach((n, i) => {
        const q = place(projection, n.lon, n.lat, width, height);
        if (!q) return;
        const m = svgEl("circle", { class: "m-claim-neighbour", cx: q[0], cy: q[1], r: 3.5, "data-row": n.row_id }, layer);
        svgTitle(m, `Photo #${i + 1} near the claim: similarity ${n.similarity.toFixed(3)}, ${fmtKm(n.distance_km)} away`);
      });
      const q = place(projection, c.lon, c.lat, width, height);
      if (!q) return;
      const g = svgEl("g", { id: "claim-marker", class: "marker-claim", "data-lat": c.lat, "data-lon": c.lon,
        transform: `translate(${q[0].toFixed(2)},${q[1].toFixed(2)})` }, layer);
      svgTitle(g, `Claimed location: ${fmtLatLon(c.lat, c.lon)}`);
      svgEl("path", { class: "m-claim", d: "M0,-9L9,0L0,9L-9,0Z" }, g);
    });
  }

  function setView(view) {
    state.view = view;
    $("view-world").setAttribute("aria-pressed", String(view === "world"));
    $("view-region").setAttribute("aria-pressed", String(view === "region"));
    drawMap();
  }

  // --- the PD chart --------------------------------------------------------------------------

  function drawPd(densities, confScale, threshold) {
    const svg = $("pd-chart");
    clear(svg, "desc");
    const W = Math.max(280, Math.min(560, Math.round(svg.parentElement.clientWidth || 480)));
    const H = 210;
    const m = { l: 44, r: 16, t: 22, b: 40 };
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    if (!densities.length) return;
    const logs = densities.map((d) => Math.log10(Math.max(d.scale_km, 1e-3)));
    const lo = Math.min(...logs);
    const hi = Math.max(...logs);
    const x = (v) => m.l + (hi > lo ? ((Math.log10(Math.max(v, 1e-3)) - lo) / (hi - lo)) : 0.5) * (W - m.l - m.r);
    const y = (v) => H - m.b - Math.max(0, Math.min(1, v)) * (H - m.t - m.b);
    for (const g of [0, 0.25, 0.5, 0.75, 1]) {
      svgEl("line", { class: "grid", x1: m.l, x2: W - m.r, y1: y(g), y2: y(g) }, svg);
      svgEl("text", { x: m.l - 6, y: y(g) + 4, "text-anchor": "end" }, svg).textContent = g.toFixed(2);
    }
    svgEl("line", { class: "axis", x1: m.l, x2: W - m.r, y1: y(0), y2: y(0) }, svg);
    svgEl("text", { x: (m.l + W - m.r) / 2, y: H - 4, "text-anchor": "middle" }, svg).textContent =
      "distance from the top cell (km, log scale)";
    if (threshold !== null && threshold !== undefined) {
      svgEl("line", { class: "threshold", x1: m.l, x2: W - m.r, y1: y(threshold), y2: y(threshold) }, svg);
      svgEl("text", { x: W - m.r, y: y(threshold) - 5, "text-anchor": "end" }, svg).textContent =
        `threshold ${threshold}`;
    }
    const d = densities.map((p, i) => `${i ? "L" : "M"}${x(p.scale_km).toFixed(1)},${y(p.density).toFixed(1)}`).join("");
    svgEl("path", { class: "curve", d }, svg);
    densities.forEach((p, i) => {
      const isConf = confScale !== null && Math.abs(p.scale_km - confScale) < 1e-9;
      const c = svgEl("circle", { class: isConf ? "pt pt-conf" : "pt", cx: x(p.scale_km), cy: y(p.density),
        r: isConf ? 6 : 3.5 }, svg);
      svgTitle(c, `PD at ${p.scale_km} km = ${p.density.toFixed(3)}`);
      svgEl("text", { x: x(p.scale_km), y: y(0) + 16, "text-anchor": "middle" }, svg).textContent = fmtScale(p.scale_km);
      // The end labels lean inwards so that they stay clear of the axis labels and the edge.
      const anchor = densities.length > 1 && i === 0 ? "start" : i === densities.length - 1 ? "end" : "middle";
      const label = svgEl("text", { class: "val", x: x(p.scale_km), y: y(p.density) - 9, "text-anchor": anchor }, svg);
      label.textContent = p.density.toFixed(2);
    });
  }

  // --- the answer ----------------------------------------------------------------------------

  function row(table, cells, cls) {
    const tr = document.createElement("tr");
    if (cls) tr.className = cls;
    for (const value of cells) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.appendChild(td);
    }
    table.querySelector("tbody").appendChild(tr);
    return tr;
  }

  function clearAnswer() {
    state.answer = null;
    $("answer").hidden = true;
    $("why").hidden = true;
    $("claim-check").hidden = true;
    $("view-region").disabled = true;
    if (state.view !== "world") setView("world");
    else drawMap();
  }

  function showAnswer(answer) {
    const r = answer.result;
    state.answer = answer;
    document.body.dataset.state = "result";
    const verdict = $("verdict");
    verdict.textContent = answer.verdict;
    verdict.className = `verdict ${r.localizable ? "yes" : "no"}`;
    setText("coords", fmtLatLon(r.lat, r.lon));
    setText("lat", r.lat.toFixed(5));
    $("lat").dataset.value = String(r.lat);
    setText("lon", r.lon.toFixed(5));
    $("lon").dataset.value = String(r.lon);
    const scale = answer.conf_scale_km;
    setText("confidence-label", scale !== null ? `Confidence (PD at ${scale} km)` : "Confidence (PD)");
    setText("confidence", r.confidence.toFixed(3));
    $("confidence").dataset.value = String(r.confidence);
    if (scale !== null) setText("pd-scale", String(scale));
    setText(
      "method",
      r.method === "swc"
        ? "SwC: centre of the largest cluster of similar photos in the top cell"
        : r.method === "cell"
          ? "Cell: centre of the most probable cell (no background photos there)"
          : r.method
    );
    $("method").dataset.value = r.method;

    const nb = $("neighbours");
    clear(nb.querySelector("tbody"));
    r.neighbours.forEach((n, i) => {
      row(nb, [
        String(i + 1),
        n.similarity.toFixed(3),
        `${n.lat.toFixed(4)}, ${n.lon.toFixed(4)}`,
        fmtKm(haversineKm(r.lat, r.lon, n.lat, n.lon)),
        n.in_prediction ? `${n.cluster} (chosen)` : String(n.cluster),
        String(n.row_id),
      ], n.in_prediction ? "in-prediction" : "");
    });
    if (!r.neighbours.length) row(nb, ["\u2013", "none returned", "", "", "", ""]);
    const cells = $("cells");
    clear(cells.querySelector("tbody"));
    r.top_cells.forEach((c, i) => {
      row(cells, [String(i + 1), String(c.id), `${(c.probability * 100).toFixed(2)}%`,
        `${c.lat.toFixed(4)}, ${c.lon.toFixed(4)}`]);
    });
    if (!r.top_cells.length && r.top_cell) {
      row(cells, ["1", String(r.top_cell.id), `${(r.top_cell.probability * 100).toFixed(2)}%`,
        `${r.top_cell.lat.toFixed(4)}, ${r.top_cell.lon.toFixed(4)}`]);
    }
    setText("model-version", r.model_version);
    setText("background-version", r.background_version);
    setText("image-size", `${r.image_width}\u00d7${r.image_height} px ${answer.upload.format}, ` +
      `${fmtBytes(answer.upload.bytes)}; model input ${r.input_width}\u00d7${r.input_height}`);
    setText("timing", `${r.timings.total_ms.toFixed(0)} ms (model ${r.timings.triton_ms.toFixed(0)} ms, ` +
      `search ${r.timings.swc_ms.toFixed(1)} ms)`);
    setText("request-id", r.request_id);
    $("answer").hidden = false;
    $("why").hidden = false;
    drawPd(r.prediction_density, scale, answer.conf_threshold);
    showClaim(r);
    $("view-region").disabled = !r.neighbours.length;
    drawMap();
    setStatus(`Located: ${fmtLatLon(r.lat, r.lon)}. ${answer.verdict}.`);
  }

  function showClaim(r) {
    const c = (r.claims || [])[0];
    $("claim-check").hidden = !c;
    if (!c) return;
    const conf = r.prediction_density.find((d) => d.scale_km === state.answer.conf_scale_km);  // the confidence scale
    const at = c.mass.find((d) => conf && d.scale_km === conf.scale_km) || c.mass[c.mass.length - 1];
    setText("claim-summary", `${fmtLatLon(c.lat, c.lon)}: ${(at.density * 100).toFixed(2)}% of the model's ` +
      `belief within ${fmtKm(at.scale_km)} of it; its cell ranks #${c.rank}; ${fmtKm(c.distance_km)} from ` +
      "the prediction.");
    $("claim-summary").dataset.rank = String(c.rank);
    const mass = $("claim-mass");
    clear(mass.querySelector("tbody"));
    c.mass.forEach((d) => {
      const pd = r.prediction_density.find((p) => p.scale_km === d.scale_km);
      const tr = row(mass, [fmtKm(d.scale_km), `${(d.density * 100).toFixed(2)}%`,
        pd ? `${(pd.density * 100).toFixed(2)}%` : "\u2013"]);
      tr.dataset.scale = String(d.scale_km);
      tr.dataset.mass = String(d.density);
    });
    const nb = $("claim-neighbours");
    clear(nb.querySelector("tbody"));
    c.neighbours.forEach((n, i) => {
      row(nb, [String(i + 1), n.similarity.toFixed(3), `${n.lat.toFixed(4)}, ${n.lon.toFixed(4)}`,
        fmtKm(n.distance_km), String(n.row_id)]);
    });
    if (!c.neighbours.length) row(nb, ["\u2013", "no background photo near the claim", "", "", ""]);
  }

  // The claim box: "lat, lon" as typed, or a place clicked on the map.
  function claimText() {
    const text = $("claim").value.trim();
    if (!text) return null;
    const m = text.match(/^(-?\d{1,2}(?:\.\d+)?)\s*[, ]\s*(-?\d{1,3}(?:\.\d+)?)$/);
    const lat = m ? Number(m[1]) : NaN;
    const lon = m ? Number(m[2]) : NaN;
    if (!(Math.abs(lat) <= 90 && Math.abs(lon) <= 180)) return undefined;
    return `${lat},${lon}`;
  }

  function pickOnMap(event) {
    const svg = $("map");
    const box = svg.getBoundingClientRect();
    const width = Number(svg.getAttribute("width")) || box.width;
    const x = ((event.clientX - box.left) / box.width) * width;
    const y = ((event.clientY - box.top) / box.height) * (Number(svg.getAttribute("height")) || box.height);
    const ll = state.projection && state.projection.invert ? state.projection.invert([x, y]) : null;
    if (!ll || !Number.isFinite(ll[0]) || !Number.isFinite(ll[1]) || Math.abs(ll[1]) > 90) return;
    const lon = ((((ll[0] + 180) % 360) + 360) % 360) - 180;
    $("claim").value = `${ll[1].toFixed(4)}, ${lon.toFixed(4)}`;
    if (state.lastFile) locateFile(state.lastFile);
  }

  // --- upload --------------------------------------------------------------------------------

  function showPreview(file) {
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = null;
    const box = $("preview-box");
    if (!file.type.startsWith("image/")) {
      box.hidden = true;
      return;
    }
    state.previewUrl = URL.createObjectURL(file);
    $("preview").src = state.previewUrl;
    setText("preview-caption", `${file.name} (${fmtBytes(file.size)})`);
    box.hidden = false;
  }

  async function locateFile(file) {
    if (!file) return;
    const claim = claimText();
    if (claim === undefined) {
      showError({ title: "The claimed location is not valid",
        message: "Type a latitude (-90 to 90) and a longitude (-180 to 180), e.g. 48.8584, 2.2945." });
      return;
    }
    state.lastFile = file;
    $("claim-check-button").disabled = false;
    const seq = ++state.seq;
    hideError();
    clearAnswer();
    showPreview(file);
    if (file.size === 0) {
      showError({ title: "The file is empty", message: "Choose a photo to upload." });
      return;
    }
    if (state.web && file.size > state.web.max_upload_bytes) {
      showError({
        title: "The file is too large",
        message: `The file is ${fmtBytes(file.size)}; the limit is ${fmtBytes(state.web.max_upload_bytes)}. ` +
          "Try a smaller or more compressed photo.",
      });
      return;
    }
    document.body.dataset.state = "loading";
    setStatus(`Locating ${file.name} (${fmtBytes(file.size)})\u2026`);
    let resp;
    let body = null;
    try {
      resp = await fetch(claim ? `/api/locate?claim=${encodeURIComponent(claim)}` : "/api/locate", {
        method: "POST",
        headers: { "Content-Type": "application/octet-stream", Accept: "application/json" },
        body: file,
      });
      body = await resp.json().catch(() => null);
    } catch (err) {
      if (seq === state.seq) {
        showError({ title: "The web app could not be reached", message: "Check the connection and try again." });
      }
      return;
    }
    if (seq !== state.seq) return; // a newer photo was chosen meanwhile
    if (!resp.ok || !body || body.error || !body.result) {
      showError((body && body.error) || { title: `The web app answered ${resp.status}`, message: "Try again." });
      return;
    }
    showAnswer(body);
  }

  function setup() {
    const input = $("file");
    input.addEventListener("change", () => {
      const file = input.files && input.files[0];
      if (file) locateFile(file);
      input.value = ""; // choosing the same file again fires "change" again
    });
    const zone = $("dropzone");
    let depth = 0;
    zone.addEventListener("dragenter", () => {
      depth += 1;
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (!depth) zone.classList.remove("over");
    });
    // Anywhere on the page: a dropped file is located, never opened by the browser.
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => {
      e.preventDefault();
      depth = 0;
      zone.classList.remove("over");
      const file = e.dataTransfer && e.dataTransfer.files[0];
      if (file) locateFile(file);
    });
    document.addEventListener("paste", (e) => {
      const file = e.clipboardData && Array.from(e.clipboardData.files)[0];
      if (file) locateFile(file);
    });
    $("claim-check-button").addEventListener("click", () => locateFile(state.lastFile));
    $("claim").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && state.lastFile) locateFile(state.lastFile);
    });
    $("map").addEventListener("click", pickOnMap);
    $("view-world").addEventListener("click", () => setView("world"));
    $("view-region").addEventListener("click", () => setView("region"));
    let pending = 0;
    window.addEventListener("resize", () => {
      clearTimeout(pending);
      pending = setTimeout(() => {
        drawMap();
        if (state.answer) drawPd(state.answer.result.prediction_density, state.answer.conf_scale_km, state.answer.conf_threshold);
      }, 150);
    });
    drawMap();
    loadWorld();
    loadInfo();
  }

  setup();
})();
